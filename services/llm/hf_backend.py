"""The ``transformers`` backend: Llama (+ LoRA adapters via PEFT) decoding token by token with a KV cache, so
signal groups can be forced as they start and their hidden states taken as they are produced."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from services.bundle.loader import Bundle
from services.contracts.errors import InvalidRequestError
from services.llm.prompt_embeds import build_prompt_embeddings
from services.contracts.llm import Done, GenerateParams, LLMEvent, SignalEvent, TextDelta
from services.llm.projectors import Projectors
from services.llm.sampling import sample
from services.llm.signals import Group, SignalController

log = logging.getLogger(__name__)
Emit = Callable[[LLMEvent], None]


class HFBackend:
    def __init__(self, bundle: Bundle, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_prompt_tokens: int | None = None) -> None:
        from peft import PeftModel
        from transformers import AutoTokenizer, LlamaForCausalLM

        self.bundle, self.manifest = bundle, bundle.manifest
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(bundle.path(self.manifest.llm.path)))
        model = LlamaForCausalLM.from_pretrained(str(bundle.path(self.manifest.llm.path)), torch_dtype=dtype)
        loras = self.manifest.llm.loras
        if loras:
            model = PeftModel.from_pretrained(model, str(bundle.path(loras[0].path)), adapter_name=loras[0].name)
            for lora in loras[1:]:
                model.load_adapter(str(bundle.path(lora.path)), adapter_name=lora.name)
        self.model = model.to(self.device).eval()
        self.embed_tokens = self.model.get_input_embeddings()
        self.projectors = Projectors(bundle, self.device)
        self.max_prompt_tokens = max_prompt_tokens or self.manifest.llm.max_model_len
        self.lora_names = [lora.name for lora in loras]
        # One generation at a time on one model: the adapter choice is model state.
        self.lock = threading.Lock()

    # -- prompt ---------------------------------------------------------------------------------------------
    def prompt_embeddings(self, params: GenerateParams, media: np.ndarray | None) -> torch.Tensor:
        """(L, hidden): text embedding rows with one projected vector per media slot."""
        weight = self.embed_tokens.weight

        def embed(ids: list[int]) -> torch.Tensor:
            with torch.inference_mode():
                return self.embed_tokens(torch.tensor(ids, device=self.device))

        embeds = build_prompt_embeddings(self.manifest, lambda t: self.tokenizer.encode(t, add_special_tokens=False),
                                         embed, params, media, self.max_prompt_tokens)
        return embeds.to(self.device, weight.dtype)

    def _adapter(self, name: str | None) -> AbstractContextManager[object]:
        if not self.lora_names:
            if name is not None:
                raise InvalidRequestError(f"unknown LoRA {name!r}: this bundle has none", code="unknown_lora",
                                          param="lora")
            return nullcontext()
        if name is None:
            return self.model.disable_adapter()
        if name not in self.lora_names:
            raise InvalidRequestError(f"unknown LoRA {name!r}; available: {self.lora_names}", code="unknown_lora",
                                      param="lora")
        self.model.set_adapter(name)
        return nullcontext()

    # -- decoding ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, params: GenerateParams, media: np.ndarray | None, emit: Emit,
                 cancelled: threading.Event) -> None:
        started = time.perf_counter()
        gen = self.manifest.generation
        lora = params.lora if params.lora is not None else self.manifest.llm.default_lora
        max_tokens = params.max_tokens or gen.max_new_tokens
        temperature = gen.temperature if params.temperature is None else params.temperature
        top_p = gen.top_p if params.top_p is None else params.top_p
        top_k = gen.top_k if params.top_k is None else params.top_k
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else
                                                  int(torch.randint(0, 2**62, (1,))))
        stop_ids = list(self.manifest.stop.token_ids)
        signals = SignalController(self.manifest, params.allowed_modalities, params.require_modalities,
                                   params.max_signal_groups, stop_ids)
        embeds = self.prompt_embeddings(params, media)
        with self.lock, self._adapter(lora):
            out = self.model(inputs_embeds=embeds[None], use_cache=True, output_hidden_states=True)
            # states[j] is the last-layer (post-norm) state whose input is generated token j; -1 is the prompt's end.
            prompt_end = out.hidden_states[-1][0, -1]
            states: list[torch.Tensor] = []
            generated: list[int] = []
            text_ids: list[int] = []
            sent = ""
            pending: list[Group] = []
            finish = "length"
            first_token_at = None
            for step in range(max_tokens):
                if cancelled.is_set():
                    finish = "cancelled"
                    break
                decision = signals.decide(max_tokens - step)
                if decision.forced is not None:
                    token = decision.forced
                else:
                    logits = out.logits[0, -1].clone()
                    if decision.banned:
                        logits[list(decision.banned)] = float("-inf")
                    token = sample(logits, temperature, top_p, top_k, generator)
                    redirected = signals.redirect_stop(token)
                    token = redirected if redirected is not None else token
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                position = len(generated)
                generated.append(token)
                group = signals.observe(token, position)
                if token in stop_ids and not signals.is_signal(token):
                    finish = "stop"
                    break
                if not signals.is_signal(token):
                    text_ids.append(token)
                    text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
                    if not text.endswith("\ufffd") and len(text) > len(sent):
                        emit(TextDelta(text[len(sent):]))
                        sent = text
                if group is not None:
                    pending.append(group)
                out = self.model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=out.past_key_values,
                                 use_cache=True, output_hidden_states=True)
                states.append(out.hidden_states[-1][0, -1])
                for ready in [g for g in pending if self._states_ready(g, len(states))]:
                    pending.remove(ready)
                    emit(self._signal(ready, states, prompt_end))
            for group in pending:  # the budget ended right after a group: its states are all there by now
                emit(self._signal(group, states, prompt_end))
        now = time.perf_counter()
        emit(Done(finish_reason=finish, prompt_tokens=int(embeds.shape[0]), completion_tokens=len(generated),  # type: ignore[arg-type]
                  timings={"ttft_ms": round(((first_token_at or now) - started) * 1000, 2),
                           "total_ms": round((now - started) * 1000, 2)}, token_ids=generated))

    def _states_ready(self, group: Group, have: int) -> bool:
        size = len(self.manifest.outputs[group.modality].signal.token_ids)
        return group.start + size + self.manifest.hidden_state_offset <= have

    def _signal(self, group: Group, states: list[torch.Tensor], prompt_end: torch.Tensor) -> SignalEvent:
        hidden = self.group_states(group, states, prompt_end)
        conditioning = self.projectors.project(group.modality, hidden)
        return SignalEvent(modality=group.modality, index=group.index, conditioning=conditioning.numpy(),
                           forced=group.forced)

    def group_states(self, group: Group, states: list[torch.Tensor], prompt_end: torch.Tensor) -> torch.Tensor:
        """States at the group's positions shifted by the bundle's offset (-1: one earlier, as the demo)."""
        size = len(self.manifest.outputs[group.modality].signal.token_ids)
        first = group.start + self.manifest.hidden_state_offset
        rows = [prompt_end if i < 0 else states[i] for i in range(first, first + size)]
        return torch.stack(rows)

    @torch.inference_mode()
    def prefill_states(self, embeds: torch.Tensor, generated: list[int], lora: str | None) -> torch.Tensor:
        """Teacher-forced pass over prompt + generated tokens: last-layer states, (L + G, hidden)."""
        tokens = self.embed_tokens(torch.tensor(generated, device=self.device)) if generated else embeds[:0]
        with self.lock, self._adapter(lora):
            out = self.model(inputs_embeds=torch.cat([embeds, tokens])[None], output_hidden_states=True)
        return out.hidden_states[-1][0]
