"""Build an LLMService from settings and a bundle (loads the model)."""

from __future__ import annotations

import logging
import os
import signal

import torch
from prometheus_client import CollectorRegistry

from services.bundle.loader import Bundle
from services.contracts.errors import ConfigurationError
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


def engine_cpus(setting: str | None, threads: int | None) -> tuple[int, ...] | None:
    """The CPUs the engine process is bound to (``LLMSettings.cpus``), among those this process may use; None:
    unbound. 'auto': the last ``threads`` of them (None: as many as torch's threads, which OMP_NUM_THREADS sets),
    none when that would be all of them (nothing would be left to the server)."""
    if setting is None:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigurationError("NEXTGPT_LLM__CPUS: this platform cannot bind a process to CPUs (Linux can)",
                                 code="invalid_settings")
    allowed = sorted(os.sched_getaffinity(0))
    if setting == "auto":
        n = threads or torch.get_num_threads()
        return tuple(allowed[-n:]) if 0 < n < len(allowed) else None
    cpus: set[int] = set()
    for part in setting.split(","):
        first, _, last = part.partition("-")
        if last and int(last) < int(first):
            raise ConfigurationError(f"NEXTGPT_LLM__CPUS: {part!r} is not a range (its end comes first)",
                                     code="invalid_settings")
        cpus.update(range(int(first), int(last or first) + 1))
    outside = sorted(cpus - set(allowed))
    if outside:
        raise ConfigurationError(f"NEXTGPT_LLM__CPUS: CPUs {outside} are not among those this server may use "
                                 f"({allowed})", code="invalid_settings")
    return tuple(sorted(cpus))


def engine_placement(settings: LLMSettings) -> tuple[int | None, tuple[int, ...] | None]:
    """The engine process's torch threads and CPUs, each worked out once: 'auto' CPUs follow from the threads, a
    list of CPUs gives the threads' default."""
    if settings.cpus is None or settings.cpus == "auto":
        threads = engine_threads(settings)
        return threads, engine_cpus(settings.cpus, threads)
    cpus = engine_cpus(settings.cpus, None)
    return engine_threads(settings, bound=len(cpus or ())), cpus


def engine_threads(settings: LLMSettings, bound: int | None = None) -> int | None:
    """Torch threads of the engine process: the setting; else, on CPU, all of torch's default but one, left to this
    server's event loop, its tokenizing and whatever shares the machine (vLLM's CPU backend reserves one the same
    way): a step split over every core waits for whichever core another process holds. Measured with
    ``make bench-gateway`` on 2 cores: first token 7.4-9.2 ms against 12.1, tokens/s +25-57% at 8 and 32 at
    once. None (torch's default) on a GPU, or when OMP_NUM_THREADS says how many. ``bound``: the number of CPUs a
    list binds the engine to, which is then the default."""
    if settings.threads:
        return settings.threads
    if settings.device != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    if bound:  # as many as the CPUs it is bound to
        return bound
    return max(1, torch.get_num_threads() - 1)


def build_llm_service(bundle: Bundle, settings: LLMSettings, registry: CollectorRegistry) -> LLMService:
    backend: HFBackend | EngineProcess | VLLMBackend
    if settings.backend == "vllm":
        assert settings.vllm_url and settings.vllm_pooler_url  # checked by LLMSettings
        backend = VLLMBackend(bundle, settings.vllm_url, settings.vllm_pooler_url, settings.timeout_s,
                              settings.max_prompt_tokens)
    elif settings.decodes_in_engine_process:
        threads, cpus = engine_placement(settings)
        backend = EngineProcess(EngineSpec(bundle.root, settings.device, settings.dtype, settings.max_prompt_tokens,
                                           settings.max_batch, settings.max_batch + settings.max_waiting,
                                           threads, cpus),
                                on_exit=_stop_server, stall_s=settings.engine_stall_s)
    else:
        if settings.threads:  # decoding shares this process: its torch threads are the process's
            torch.set_num_threads(settings.threads)
        backend = HFBackend(bundle, settings.device, getattr(torch, settings.dtype), settings.max_prompt_tokens,
                            settings.max_batch)
    return LLMService(backend, settings, LLMMetrics(registry), bundle.manifest)
