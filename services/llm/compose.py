"""Build an LLMService from settings and a bundle (loads the model)."""

from __future__ import annotations

import logging
import os
import signal

import torch
from prometheus_client import CollectorRegistry

from services.bundle.loader import Bundle
from services.contracts.settings import LLMSettings
from services.llm.engine_process import EngineProcess, EngineSpec
from services.llm.hf_backend import HFBackend
from services.llm.metrics import LLMMetrics
from services.llm.serving import LLMService
from services.llm.vllm_backend import VLLMBackend

log = logging.getLogger(__name__)


def _stop_server(reason: str) -> None:
    # Nothing can decode in this process any more: stop the server (SIGTERM: a graceful shutdown) so that its
    # supervisor starts a fresh one, as the embedded decoder pool does for a broken device.
    log.critical("the LLM engine process died (%s); stopping the server so that it is restarted", reason)
    os.kill(os.getpid(), signal.SIGTERM)


def build_llm_service(bundle: Bundle, settings: LLMSettings, registry: CollectorRegistry) -> LLMService:
    backend: HFBackend | EngineProcess | VLLMBackend
    if settings.backend == "vllm":
        assert settings.vllm_url and settings.vllm_pooler_url  # checked by LLMSettings
        backend = VLLMBackend(bundle, settings.vllm_url, settings.vllm_pooler_url, settings.timeout_s,
                              settings.max_prompt_tokens)
    elif settings.engine_process:
        backend = EngineProcess(EngineSpec(bundle.root, settings.device, settings.dtype, settings.max_prompt_tokens,
                                           settings.max_batch, settings.max_batch + settings.max_waiting,
                                           settings.threads),
                                on_exit=_stop_server, stall_s=settings.engine_stall_s)
    else:
        if settings.threads:  # decoding shares this process: its torch threads are the process's
            torch.set_num_threads(settings.threads)
        backend = HFBackend(bundle, settings.device, getattr(torch, settings.dtype), settings.max_prompt_tokens,
                            settings.max_batch)
    return LLMService(backend, settings, LLMMetrics(registry), bundle.manifest)
