"""Wiring: settings -> bundle -> stores -> apps. Heavy imports happen here, at start-up, never at import."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from prometheus_client import CollectorRegistry

from gateway.app import GatewayState, ModelCard, build_app
from gateway.artifact_refs import ArtifactRefs
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimiter
from gateway.security import ApiKeys, UrlSigner, read_key_file
from services.bundle.loader import Bundle
from services.contracts.errors import ConfigurationError, ServiceUnavailableError
from services.contracts.settings import Settings
from services.storage import build_artifact_store, build_retention

log = logging.getLogger(__name__)


class StopOnLoadFailure:
    """Handed to a model service: when its model cannot load, stop the server so the process exits non-zero
    with the reason (its supervisor restarts it) instead of living on, never ready."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server: Any = None
        self.reason: str | None = None

    def __call__(self, reason: str) -> None:
        self.reason = reason
        if self.server is not None:
            self.server.should_exit = True

    def serve(self, app: Any, host: str, port: int, log_level: str) -> None:
        import uvicorn

        from services.web.keep_alive import SERVER_IDLE_S

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_keep_alive=SERVER_IDLE_S))
        self.server.run()
        if self.reason is not None:
            raise ServiceUnavailableError(f"{self.name} failed to load its model: {self.reason}",
                                          code="load_failed")


def model_cards(bundle: Bundle) -> list[ModelCard]:
    manifest = bundle.manifest
    outputs = sorted(manifest.outputs)
    cards = [ModelCard(id=manifest.name, modalities=["text", *outputs])]
    cards += [ModelCard(id=lora.name, root=manifest.name, modalities=["text", *outputs]) for lora in manifest.llm.loras]
    return cards


def api_keys(settings: Settings) -> list[str] | None:
    """The keys of NEXTGPT_API_KEYS and NEXTGPT_API_KEYS_FILE together; None when neither names one (auth off).
    A configured file that cannot be read stops start-up: silently running without auth would be worse."""
    keys = _env_keys(settings)
    if settings.api_keys_file is not None:
        keys += read_key_file(settings.api_keys_file)
    return keys or None


def _env_keys(settings: Settings) -> list[str]:
    raw = settings.api_keys.get_secret_value() if settings.api_keys else ""
    return [k.strip() for k in raw.split(",") if k.strip()]


def _keys_and_signer(settings: Settings) -> tuple[ApiKeys, UrlSigner]:
    g = settings.gateway
    signing = g.url_signing_key.get_secret_value().encode() if g.url_signing_key else None
    # The file is read here (a bad one stops start-up) and again whenever it changes.
    keys = ApiKeys(_env_keys(settings), settings.api_keys_file)
    return keys, UrlSigner(signing, g.artifact_url_ttl_s)


@dataclass
class _DecoderHooks:
    """What a decoder process adds to the embedded app: start-up waits for its pipelines (or fails if they cannot
    load), shutdown ends it, and /readyz is degraded (text still works) while a child cannot load them."""

    on_startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_shutdown: list[Callable[[], None]] = field(default_factory=list)
    checks: dict[str, Callable[[], None]] = field(default_factory=dict)


def _decoder_hooks(pipelines: object) -> _DecoderHooks:
    from services.decoders.pipeline_process import PipelineProcess

    if not isinstance(pipelines, PipelineProcess):
        return _DecoderHooks()

    async def loaded() -> None:
        await asyncio.to_thread(pipelines.wait_ready)

    return _DecoderHooks([loaded], [pipelines.close], {"decoders": pipelines.check_health})


def decoder_threads_beside_llm(settings: Settings) -> int | None:
    """The embedded decoder process's torch threads while the LLM generates (``decoders.threads_beside_llm``);
    None: it never switches. By default, on CPU, the cores the LLM engine leaves: a team with a thread per core
    slows 3-4x once the engine holds one of them. On 2 cores, switching to one thread while the LLM generates made
    1.92x the pictures beside two chat streams, and the streams 1.63x the tokens a second (``make bench-mixed``);
    one thread always would make 0.6x alone."""
    import torch

    from services.llm.compose import engine_placement

    d, llm = settings.decoders, settings.llm
    if not d.engine_process or d.device != "cpu" or d.threads_beside_llm == 0:
        return None
    if d.threads_beside_llm:
        return d.threads_beside_llm
    if llm.url or llm.backend != "transformers" or llm.device != "cpu":
        return None  # the LLM computes elsewhere: nothing to leave it
    llm_threads = engine_placement(llm)[0] if llm.engine_process else (llm.threads or torch.get_num_threads())
    if llm_threads is None:  # OMP_NUM_THREADS sets every process's threads
        return None
    own = d.threads or torch.get_num_threads()
    beside = max(1, own - llm_threads)
    return beside if beside < own else None


def embedded_app(settings: Settings, bundle: Bundle) -> FastAPI:
    """The whole stack in one process: encoder, LLM and decoders behind the same interfaces as over the network."""
    from gateway.chat import ChatService
    from gateway.conversations import MemoryConversationStore
    from gateway.streams import MemoryEventLog, StreamHub
    from services.decoders.compose import build_runner
    from services.decoders.local_queue import LocalDecoderQueue
    from services.decoders.pipeline_process import PipelineProcess
    from services.encoder.clients import InProcessEncoderClient
    from services.encoder.compose import build_encoder_service
    from services.jobs.book import MemoryJobBook
    from services.llm.clients import InProcessLLMClient
    from services.llm.compose import build_llm_service

    store = build_artifact_store(settings)
    retention = build_retention(settings, store)
    registry = CollectorRegistry()
    book = MemoryJobBook()
    # First: a decoder process loads its pipelines while the encoder and the LLM load here.
    beside_llm = decoder_threads_beside_llm(settings)
    runner = build_runner(settings, bundle, list(bundle.manifest.outputs), book,
                          own_process=settings.decoders.engine_process, registry=registry,
                          threads_contended=beside_llm)
    encoder = build_encoder_service(bundle, settings.encoder, registry, store)
    llm = build_llm_service(bundle, settings.llm, registry)
    if beside_llm is not None and isinstance(runner.pipelines, PipelineProcess):
        llm.activity.subscribe(runner.pipelines.set_contended)
        log.info("decoder process: %d torch thread(s) while the LLM generates", beside_llm)
    decoders = LocalDecoderQueue(runner, book, max_queued=settings.decoders.max_queued,
                                 max_retries=settings.decoders.max_retries, max_batch=settings.decoders.max_batch,
                                 queue_wait_s=settings.decoders.queue_wait_s,
                                 batch_wait_s=settings.decoders.batch_wait_s)
    hooks = _decoder_hooks(runner.pipelines)
    g = settings.gateway
    conversations = MemoryConversationStore(g.max_conversations, g.max_conversation_turns, g.conversation_ttl_s)
    metrics = GatewayMetrics(registry)
    keys, signer = _keys_and_signer(settings)
    chat = ChatService(InProcessEncoderClient(encoder), InProcessLLMClient(llm), decoders, store, conversations,
                       g.inline_max_bytes, metrics, settings.decoders.max_pixels_per_job, bundle.manifest,
                       settings.llm.max_media, ArtifactRefs(signer), settings.encoder.max_files)
    state = GatewayState(
        models=model_cards(bundle), readiness_checks={"artifact_store": store.check_health},
        advisory_checks=hooks.checks,
        redirect_downloads_ttl_s=settings.storage.presign_ttl_s if settings.storage.redirect_downloads else None,
        settings=settings.gateway, chat=chat, store=store, decoders=decoders, keys=keys, signer=signer,
        limiter=RateLimiter(settings.gateway.rate_limit_per_minute),
        on_startup=[encoder.start, retention.start, *hooks.on_startup],
        on_shutdown=[retention.stop, encoder.stop, llm.close, decoders.close, *hooks.on_shutdown],
        registry=registry,
        streams=StreamHub(MemoryEventLog(g.replay_max_events, g.replay_ttl_s, max_bytes=g.replay_max_bytes),
                          g.resume_grace_s,
                          active=metrics.streams),
        metrics=metrics,
    )
    return build_app(state)


def distributed_gateway_app(settings: Settings, bundle: Bundle) -> FastAPI:
    """The gateway alone: encoder and LLM over HTTP, decode jobs over Celery + Redis, artifacts in storage."""
    import httpx

    from gateway.chat import ChatService
    from gateway.conversations import RedisConversationStore
    from gateway.streams import RedisEventLog, StreamHub
    from services.clients.decoder_celery import CeleryDecoderQueue, make_client_app, redis_clients
    from services.clients.encoder_http import HttpEncoderClient
    from services.web.keep_alive import CLIENT_IDLE_S
    from services.clients.llm_http import HttpLLMClient
    from services.contracts.errors import ServiceUnavailableError
    from services.jobs.book import RedisJobBook
    from services.jobs.reader import AsyncJobReader

    if not settings.encoder.url or not settings.llm.url:
        raise ConfigurationError("the distributed gateway needs NEXTGPT_ENCODER__URL and NEXTGPT_LLM__URL",
                                 code="invalid_settings")
    store = build_artifact_store(settings)
    retention = build_retention(settings, store)
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=256, max_keepalive_connections=64,
                                                 keepalive_expiry=CLIENT_IDLE_S))
    encoder = HttpEncoderClient(settings.encoder.url, http, settings.encoder.timeout_s)
    llm = HttpLLMClient(settings.llm.url, settings.llm.timeout_s, accept_timeout_s=settings.llm.accept_timeout_s)
    sync_redis, async_redis = redis_clients(settings)
    prefix = settings.redis.key_prefix
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    decoders = CeleryDecoderQueue(make_client_app(settings), RedisJobBook(sync_redis, prefix),
                                  AsyncJobReader(async_redis, prefix), settings.decoders.queue_wait_s,
                                  tuple(bundle.manifest.outputs), lost_after_s=settings.decoders.lock_ttl_s,
                                  on_lost=lambda outcome: metrics.lost_jobs.labels(outcome).inc())

    async def redis_ready() -> None:
        try:
            await async_redis.ping()
        except Exception as exc:
            raise ServiceUnavailableError(f"redis: {exc}", code="redis_unavailable") from exc

    keys, signer = _keys_and_signer(settings)
    g = settings.gateway
    conversations = RedisConversationStore(async_redis, prefix, g.conversation_ttl_s, g.max_conversation_turns)
    state = GatewayState(
        models=model_cards(bundle),
        readiness_checks={"encoder": encoder.check_ready, "llm": llm.check_ready, "redis": redis_ready,
                          "artifact_store": store.check_health},
        advisory_checks={"decoder_workers": decoders.check_workers},
        redirect_downloads_ttl_s=settings.storage.presign_ttl_s if settings.storage.redirect_downloads else None,
        settings=g, chat=ChatService(encoder, llm, decoders, store, conversations, g.inline_max_bytes, metrics,
                                        settings.decoders.max_pixels_per_job, bundle.manifest,
                                        settings.llm.max_media, ArtifactRefs(signer), settings.encoder.max_files),
        store=store, decoders=decoders, keys=keys, signer=signer,
        limiter=RateLimiter(g.rate_limit_per_minute), on_startup=[retention.start],
        on_shutdown=[retention.stop, http.aclose, llm.aclose, async_redis.aclose],
        streams=StreamHub(RedisEventLog(async_redis, prefix, g.replay_max_events, g.replay_ttl_s,
                                        linger_s=g.replay_write_linger_s, local_max_bytes=g.replay_max_bytes,
                                        inline_max_bytes=g.replay_inline_max_bytes, lease_s=g.stream_lease_s),
                          g.resume_grace_s,
                          active=metrics.streams),
        registry=registry, metrics=metrics,
    )
    return build_app(state)


def bundle_summary(bundle: Bundle) -> dict[str, object]:
    m = bundle.manifest
    return {
        "path": str(bundle.root),
        "name": m.name,
        "version": m.version,
        "llm": {"hidden_size": m.llm.hidden_size, "vocab_size": m.llm.vocab_size,
                "loras": [lora.name for lora in m.llm.loras], "default_lora": m.llm.default_lora},
        "hidden_state_offset": m.hidden_state_offset,
        "stop": m.stop.model_dump(),
        "outputs": {
            k: {"signal_tokens": len(v.signal.tokens), "first_id": v.signal.token_ids[0],
                "conditioning": list(v.projector.output_shape), "decoder": v.decoder.source}
            for k, v in m.outputs.items()
        },
        "size_mb": round(sum(p.stat().st_size for p in Path(bundle.root).rglob("*") if p.is_file()) / 2**20, 1),
    }
