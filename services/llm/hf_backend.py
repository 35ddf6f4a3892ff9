"""The ``transformers`` backend: Llama (+ LoRA adapters via PEFT) decoding token by token with a KV cache, so
signal groups can be forced as they start and their hidden states taken as they are produced. Replies are decoded
together in one running batch (``hf_batch``); this class loads the model and builds each reply's prompt."""

from __future__ import annotations

import threading

import numpy as np
import torch

from services.bundle.loader import Bundle
from services.contracts.errors import InvalidRequestError
from services.contracts.llm import Accepted, GenerateParams
from services.llm.hf_batch import BatchEngine
from services.llm.hf_sequence import Emit, Sequence
from services.llm.projectors import Projectors
from services.llm.prompt_embeds import build_prompt_embeddings


class HFBackend:
    def __init__(self, bundle: Bundle, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_prompt_tokens: int | None = None, max_batch: int = 16) -> None:
        from peft import PeftModel
        from transformers import AutoTokenizer, LlamaForCausalLM

        self.bundle, self.manifest = bundle, bundle.manifest
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(bundle.path(self.manifest.llm.path)))
        model = LlamaForCausalLM.from_pretrained(str(bundle.path(self.manifest.llm.path)), dtype=dtype)
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
        base = self.model.get_base_model() if loras else self.model
        self.engine = BatchEngine(self.model, base.model.norm, self.lora_names, max_batch, self.device)

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

    def _check_adapter(self, name: str | None) -> None:
        if name is None:
            return
        if not self.lora_names:
            raise InvalidRequestError(f"unknown LoRA {name!r}: this bundle has none", code="unknown_lora",
                                      param="lora")
        if name not in self.lora_names:
            raise InvalidRequestError(f"unknown LoRA {name!r}; available: {self.lora_names}", code="unknown_lora",
                                      param="lora")

    # -- decoding ---------------------------------------------------------------------------------------------
    def generate(self, params: GenerateParams, media: np.ndarray | None, emit: Emit,
                 cancelled: threading.Event) -> None:
        """Decode one reply inside the running batch; returns when it is done (events went out through ``emit``)."""
        sequence = Sequence(self.manifest, self.tokenizer, self.projectors, params,
                            self.prompt_embeddings(params, media), emit, cancelled)
        self._check_adapter(sequence.lora)
        emit(Accepted(sequence.prompt_tokens))
        self.engine.submit(sequence)
        sequence.finished.wait()
        if sequence.error is not None:
            raise sequence.error

    def close(self) -> None:
        self.engine.close()

    @torch.inference_mode()
    def prefill_states(self, embeds: torch.Tensor, generated: list[int], lora: str | None) -> torch.Tensor:
        """Teacher-forced pass over prompt + generated tokens: last-layer states, (L + G, hidden)."""
        tokens = self.embed_tokens(torch.tensor(generated, device=self.device)) if generated else embeds[:0]
        with self.engine.model_lock:
            _, states = self.engine.forward([lora], inputs_embeds=torch.cat([embeds, tokens])[None],
                                            logits_to_keep=1)
        return states[0]
