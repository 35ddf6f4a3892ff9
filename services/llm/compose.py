"""Build an LLMService from settings and a bundle (loads the model)."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry

from services.bundle.loader import Bundle
from services.contracts.settings import LLMSettings
from services.llm.hf_backend import HFBackend
from services.llm.metrics import LLMMetrics
from services.llm.serving import LLMService
from services.llm.vllm_backend import VLLMBackend


def build_llm_service(bundle: Bundle, settings: LLMSettings, registry: CollectorRegistry) -> LLMService:
    backend: HFBackend | VLLMBackend
    if settings.backend == "vllm":
        assert settings.vllm_url and settings.vllm_pooler_url  # checked by LLMSettings
        backend = VLLMBackend(bundle, settings.vllm_url, settings.vllm_pooler_url, settings.timeout_s,
                              settings.max_prompt_tokens)
    else:
        backend = HFBackend(bundle, settings.device, getattr(torch, settings.dtype), settings.max_prompt_tokens,
                            settings.max_batch)
    return LLMService(backend, settings, LLMMetrics(registry), bundle.manifest)
