"""Continuous batching for the transformers backend: one thread owns the model and advances every running reply by
one token per step; new replies join at step boundaries (their prompt prefilled once, their cache merged into the
batch's), finished or cancelled ones leave. Each row carries its own LoRA adapter (PEFT's mixed-adapter batches),
its own sampling and its own generator.

The batch's KV cache is left-padded to a common length; an attention mask hides the padding and explicit position
ids keep each reply's positions its own, so padding changes nothing a reply computes beyond float rounding.
Only the final norm's output (the last-layer state the signal groups need) is kept, and logits only for the last
position.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.llm.hf_sequence import Sequence

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


def _host(logits: torch.Tensor) -> torch.Tensor:
    """The last position's logits of every row, as float32 on the CPU, in one transfer per pass: each reply
    samples there with its own CPU generator, so a seed draws the same tokens whatever device the model is on
    (and the masks and generators never meet a CUDA tensor)."""
    return logits[:, -1].float().cpu()


class LastStates:
    """Captures the final norm's output (the last layer's post-norm states) of each forward pass."""

    def __init__(self, norm: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        norm.register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self.value = output

    def take(self) -> torch.Tensor:
        assert self.value is not None
        value, self.value = self.value, None
        return value


class BatchEngine:
    def __init__(self, model: nn.Module, norm: nn.Module, lora_names: list[str], max_batch: int,
                 device: torch.device) -> None:
        self.model, self.device, self.max_batch = model, device, max_batch
        self.mixed_adapters = bool(lora_names)
        self._active = lora_names[0] if lora_names else None  # PEFT activates the first adapter it loads
        self._enabled = True  # whether the LoRA layers apply an adapter (off: the base model)
        self.states = LastStates(norm)
        # Serialises every use of the model: the engine's steps and teacher-forced passes from other threads.
        self.model_lock = threading.Lock()
        self._cv = threading.Condition()
        self._joining: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cache: Any = None  # the running batch's DynamicCache, rows in the order of _running
        self._mask: torch.Tensor | None = None  # (batch, cache length): 1 for real tokens, 0 for left padding
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="llm-batch", daemon=True)
        self._thread.start()

    # -- public ------------------------------------------------------------------------------------------------
    def submit(self, sequence: Sequence) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the LLM engine is closed")
            self._joining.append(sequence)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    @property
    def running(self) -> int:
        return len(self._running)

    def forward(self, adapters: list[str | None], **inputs: Any) -> tuple[Any, torch.Tensor]:
        """One pass of the model (caller holds ``model_lock``): its output and the last layer's states.

        ``adapters``: each row's LoRA (None: the base model). PEFT's mixed-adapter path splits every LoRA layer's
        input by adapter in Python, which cost more than half of a decode step when measured, so it is taken only
        when the rows really differ; a batch on one adapter runs the plain path with that adapter active."""
        if self.mixed_adapters:
            names = set(adapters)
            mixed = len(names) > 1
            if mixed:
                inputs["adapter_names"] = [a or BASE_ADAPTER for a in adapters]
            self._use(None if mixed else adapters[0], mixed)
        out = self.model(**inputs)
        return out, self.states.take()

    def _use(self, adapter: str | None, mixed: bool) -> None:
        """Put the LoRA layers in the state a pass needs, changing only what differs from the last pass. Not
        PEFT's ``disable_adapter()`` context per pass: it walks every module twice and asks for the model's status,
        which doubled a decode step of the tiny bundle (5.0 ms against 2.8 ms at batch 16) for base-model replies.
        The mixed path needs the layers on (a disabled layer ignores ``adapter_names``)."""
        enabled = mixed or adapter is not None
        if enabled != self._enabled:
            layers = self.model.base_model
            layers.enable_adapter_layers() if enabled else layers.disable_adapter_layers()
            self._enabled = enabled
        if adapter is not None and adapter != self._active:
            self.model.set_adapter(adapter)
            self._active = adapter

    # -- the loop ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._joining and not self._running:
                    self._cv.wait()
                if self._closed:
                    break
                room = self.max_batch - len(self._running)
                joiners = [self._joining.popleft() for _ in range(min(room, len(self._joining)))]
            try:
                with torch.inference_mode(), self.model_lock:
                    self._admit(joiners)
                    if self._running:
                        self._step()
            except Exception as exc:  # a bug here must fail the replies it touched, not stop the engine for all
                log.exception("the LLM engine's step failed; failing its %d replies", len(self._running))
                for sequence in [*self._running, *joiners]:
                    if not sequence.finished.is_set():
                        sequence.fail(exc)
                self._running, self._cache, self._mask = [], None, None
        for sequence in [*self._running, *self._joining]:
            sequence.fail(RuntimeError("the LLM engine was closed"))

    def _admit(self, joiners: list[Sequence]) -> None:
        """Prefill every joiner's prompt in one left-padded pass and add them to the running batch."""
        for sequence in [s for s in joiners if s.cancelled.is_set()]:
            sequence.finish("cancelled")
        joiners = [s for s in joiners if not s.cancelled.is_set()]
        if not joiners:
            return
        width = max(s.prompt_tokens for s in joiners)
        embeds = torch.stack([F.pad(s.embeds, (0, 0, width - s.prompt_tokens, 0)) for s in joiners])
        mask = torch.stack([F.pad(torch.ones(s.prompt_tokens, dtype=torch.long, device=self.device),
                                  (width - s.prompt_tokens, 0)) for s in joiners])
        try:
            out, states = self.forward([s.lora for s in joiners], inputs_embeds=embeds, attention_mask=mask,
                                       position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0), use_cache=True,
                                       logits_to_keep=1)
        except Exception as exc:  # these prompts' own failure (e.g. out of memory): the running batch goes on
            log.exception("prefill failed for %d prompts", len(joiners))
            for sequence in joiners:
                sequence.fail(exc)
            return
        logits = _host(out.logits)
        for i, sequence in enumerate(joiners):
            sequence.prefilled(logits[i], states[i, -1])
        self._merge(out.cache, mask)
        self._running += joiners

    def _step(self) -> None:
        keep: list[int] = []
        tokens: list[int] = []
        for i, sequence in enumerate(self._running):
            try:
                token = sequence.choose()
            except Exception as exc:  # this reply's own failure (its sampling, its text): the others go on
                log.exception("choosing the next token failed for one reply")
                sequence.fail(exc)
                continue
            if token is not None:
                keep.append(i)
                tokens.append(token)
        self._select(keep)
        if not self._running:
            return
        assert self._mask is not None
        batch = len(self._running)
        self._mask = torch.cat([self._mask, self._mask.new_ones(batch, 1)], dim=1)
        try:
            out, states = self.forward(
                [s.lora for s in self._running], input_ids=torch.tensor(tokens, device=self.device)[:, None],
                attention_mask=self._mask, cache=self._cache, use_cache=True, logits_to_keep=1,
                position_ids=torch.tensor([s.length for s in self._running], device=self.device)[:, None])
        except Exception as exc:  # the whole batch shared the pass: each of its replies gets the error
            log.exception("decode step failed for a batch of %d", batch)
            for sequence in self._running:
                sequence.fail(exc)
            self._running, self._cache, self._mask = [], None, None
            return
        self._cache = out.cache
        logits = _host(out.logits)
        self._select([i for i, s in enumerate(self._running) if not self._fed(s, logits[i], states[i, -1])])

    @staticmethod
    def _fed(sequence: Sequence, logits: torch.Tensor, state: torch.Tensor) -> bool:
        """Hands a reply its step's rows; True when it is done (finished, or failed on its own: projecting a
        signal group, say, without failing the batch)."""
        try:
            return sequence.fed(logits, state)
        except Exception as exc:
            log.exception("a reply failed after its decode step")
            sequence.fail(exc)
            return True

    # -- the batch's cache ---------------------------------------------------------------------------------------
    def _merge(self, cache: Any, mask: torch.Tensor) -> None:
        """Add prefilled replies' cache rows (``mask``: their padding) after the batch's, left-padding the shorter."""
        if self._cache is None or self._mask is None:
            self._cache, self._mask = cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        grow, pad = width - self._mask.shape[1], width - mask.shape[1]
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([F.pad(mine.keys, (0, 0, grow, 0)), F.pad(theirs.keys, (0, 0, pad, 0))])
            mine.values = torch.cat([F.pad(mine.values, (0, 0, grow, 0)), F.pad(theirs.values, (0, 0, pad, 0))])
        self._mask = torch.cat([F.pad(self._mask, (grow, 0)), F.pad(mask, (pad, 0))])

    def _select(self, rows: list[int]) -> None:
        """Keep these rows of the batch; drop padding columns no remaining row needs."""
        if len(rows) == len(self._running):
            return
        self._running = [self._running[i] for i in rows]
        if not rows or self._mask is None:
            self._running, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(rows, device=self.device)
        self._mask = self._mask[index]
        unused = int(self._mask.sum(dim=0).eq(0).long().cumprod(dim=0).sum())  # leading all-padding columns
        self._mask = self._mask[:, unused:]
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[index, :, unused:], layer.values[index, :, unused:]
