"""Build an LLMService from settings and a bundle (loads the model)."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry

from services.bundle.loader import Bundle
from services.contracts.errors import ConfigurationError
from services.contracts.settings import LLMSettings
from services.llm.hf_backend import HFBackend
from services.llm.metrics import LLMMetrics
from services.llm.serving import LLMService


def build_llm_service(bundle: Bundle, settings: LLMSettings, registry: CollectorRegistry) -> LLMService:
    if settings.backend != "transformers":
        raise ConfigurationError(
            f"NEXTGPT_LLM__BACKEND={settings.backend!r} is not available in this build yet; use 'transformers'",
            code="backend_unavailable")
    backend = HFBackend(bundle, settings.device, getattr(torch, settings.dtype), settings.max_prompt_tokens)
    return LLMService(backend, settings, LLMMetrics(registry), bundle.manifest.llm.hidden_size)
