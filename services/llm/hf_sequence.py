"""One reply being decoded in the transformers backend's running batch: its sampling parameters and generator, its
signal controller, its text so far and the last-layer states its signal groups need. The batch engine feeds it one
row of logits and one row of states per step; everything a sequence decides depends only on its own rows, so its
output for a seed does not depend on what else is in the batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from services.contracts.bundle_manifest import BundleManifest
from services.contracts.llm import Done, GenerateParams, LLMEvent, SignalEvent, TextDelta
from services.llm.detokenize import Decoder, TextStream
from services.llm.projectors import Projectors
from services.llm.sampling import sample
from services.llm.signals import Group, SignalController
from services.llm.stop_strings import StopStrings

Emit = Callable[[LLMEvent], None]
Finish = Literal["stop", "length", "cancelled"]


class Sequence:
    def __init__(self, manifest: BundleManifest, tokenizer: Decoder, projectors: Projectors,
                 params: GenerateParams, embeds: torch.Tensor, emit: Emit, cancelled: threading.Event) -> None:
        gen = manifest.generation
        self.manifest, self.projectors, self.emit, self.cancelled = manifest, projectors, emit, cancelled
        self.embeds = embeds  # (L, hidden) prompt embeddings; dropped once prefilled
        self.prompt_tokens = int(embeds.shape[0])
        self.lora = params.lora if params.lora is not None else manifest.llm.default_lora
        self.max_tokens = params.max_tokens or gen.max_new_tokens
        self.temperature = gen.temperature if params.temperature is None else params.temperature
        self.top_p = gen.top_p if params.top_p is None else params.top_p
        self.top_k = gen.top_k if params.top_k is None else params.top_k
        self.generator = torch.Generator().manual_seed(
            params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,))))
        self.stop_ids = set(manifest.stop.token_ids)
        self.stop_token = manifest.stop.token_ids[0]
        # After a stop string the text is over: each sampled token counts as the stop token, which the signal
        # controller turns into a group the reply still owes (require_modalities) or the end.
        self.stop_strings = StopStrings(params.stop)
        self.signals = SignalController(manifest, params.allowed_modalities, params.require_modalities,
                                        params.max_signal_groups, list(manifest.stop.token_ids))
        self.text = TextStream(tokenizer)
        self.generated: list[int] = []
        # states[j]: the last-layer (post-norm) state whose input is generated token j; prompt_end: the prompt's.
        self.states: list[torch.Tensor] = []
        self.prompt_end: torch.Tensor | None = None
        self.pending: list[Group] = []
        self._banned: dict[frozenset[int], torch.Tensor] = {}
        self.logits: torch.Tensor | None = None  # next-token logits, (vocab,)
        self.length = 0  # tokens in this sequence's cache (prompt + fed generated tokens)
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished = threading.Event()
        self.error: BaseException | None = None

    # -- the engine's calls ------------------------------------------------------------------------------------
    def prefilled(self, logits: torch.Tensor, prompt_end: torch.Tensor) -> None:
        self.logits, self.prompt_end, self.length = logits, prompt_end, self.prompt_tokens
        self.embeds = self.embeds[:0]

    def choose(self) -> int | None:
        """The next token from this step's logits, or None when the reply ends here (stop or cancel)."""
        if self.cancelled.is_set():
            self.finish("cancelled")
            return None
        assert self.logits is not None
        remaining = self.max_tokens - len(self.generated)
        decision = self.signals.decide(remaining)
        if decision.forced is not None:
            token = decision.forced
        else:
            logits = self.logits
            if decision.banned:
                logits = logits.index_fill(0, self._index(decision.banned), float("-inf"))
            sampled = sample(logits, self.temperature, self.top_p, self.top_k, self.generator)
            chosen = self.signals.choose(self.stop_token if self.stop_strings.matched else sampled, remaining)
            if chosen is None:  # a group that would not fit the budget: the reply ends where it would start
                self.finish("length")
                return None
            token = chosen
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        position = len(self.generated)
        self.generated.append(token)
        group = self.signals.observe(token, position)
        if token in self.stop_ids and not self.signals.is_signal(token):
            self.finish("stop")
            return None
        if group is not None and group.made:
            self.pending.append(group)
        if not self.signals.is_signal(token) and self._text(token) and not self.signals.pending():
            self.finish("stop")
            return None
        return token

    def _text(self, token: int) -> bool:
        """Sends the token's text (less what a stop string may be starting); True when a stop string ended it."""
        delta = self.text.push(token)
        if not delta:
            return False
        out = self.stop_strings.push(delta)
        if out.text:
            self.emit(TextDelta(out.text))
        return out.matched

    def _index(self, banned: frozenset[int]) -> torch.Tensor:
        # The masked set repeats from step to step (the signal tokens after a group's first): build it once.
        index = self._banned.get(banned)
        if index is None:
            index = self._banned[banned] = torch.tensor(sorted(banned), dtype=torch.long)
        return index

    def fed(self, logits: torch.Tensor, state: torch.Tensor) -> bool:
        """The chosen token went through the model: its state and the next logits. True when the reply is done."""
        self.logits, self.length = logits, self.length + 1
        self.states.append(state)
        for ready in [g for g in self.pending if self._states_ready(g)]:
            self.pending.remove(ready)
            self.emit(self._signal(ready))
        if len(self.generated) >= self.max_tokens:
            self.finish("length")
            return True
        return False

    def finish(self, reason: Finish) -> None:
        held = self.stop_strings.flush()  # held back as a possible stop string's start: it was text after all
        if held:
            self.emit(TextDelta(held))
        # A group whose last token was fed has all its states (offset <= 0): nothing is ever left half-done.
        for group in self.pending:
            self.emit(self._signal(group))
        self.pending.clear()
        now = time.perf_counter()
        self.emit(Done(finish_reason=reason, prompt_tokens=self.prompt_tokens, completion_tokens=len(self.generated),
                       timings={"ttft_ms": round(((self.first_token_at or now) - self.started) * 1000, 2),
                                "total_ms": round((now - self.started) * 1000, 2)}, token_ids=self.generated))
        self.finished.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.finished.set()

    # -- signal groups -----------------------------------------------------------------------------------------
    def _states_ready(self, group: Group) -> bool:
        size = len(self.manifest.outputs[group.modality].signal.token_ids)
        return group.start + size + self.manifest.hidden_state_offset <= len(self.states)

    def _signal(self, group: Group) -> SignalEvent:
        conditioning = self.projectors.project(group.modality, self.group_states(group))
        return SignalEvent(modality=group.modality, index=group.index, conditioning=np.asarray(conditioning.numpy()),
                           forced=group.forced)

    def group_states(self, group: Group) -> torch.Tensor:
        """States at the group's positions shifted by the bundle's offset (-1: one earlier, as the demo)."""
        size = len(self.manifest.outputs[group.modality].signal.token_ids)
        first = group.start + self.manifest.hidden_state_offset
        assert self.prompt_end is not None
        return torch.stack([self.prompt_end if i < 0 else self.states[i] for i in range(first, first + size)])
