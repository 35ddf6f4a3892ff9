"""What the gateway's routes use, built by the composition root and handed to ``build_app``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from gateway.chat import ChatService
from gateway.metrics import GatewayMetrics
from gateway.openai_serving import OpenAIServingChat
from gateway.ratelimit import RateLimiter
from gateway.security import ApiKeys, UrlSigner
from gateway.streams import MemoryEventLog, StreamHub
from services.contracts.decoders import DecoderQueue
from services.contracts.settings import GatewaySettings
from services.contracts.storage import ArtifactStore


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    owned_by: str = "nextgpt-serve"
    root: str | None = None
    modalities: list[str] = []


@dataclass
class GatewayState:
    models: list[ModelCard]
    # Each check raises when its dependency is not usable; /readyz runs them all.
    readiness_checks: dict[str, Callable[[], Awaitable[None] | None]]
    # Reported by /readyz when they fail, without making the gateway unready: text still works without them.
    advisory_checks: dict[str, Callable[[], Awaitable[None] | None]] = field(default_factory=dict)
    # The OpenAI-compatible endpoint; built from the above by ``build_app`` when not given.
    openai: OpenAIServingChat | None = None  # type: ignore[assignment]
    # Seconds a presigned store URL lives when downloads redirect to the store; None streams them through.
    redirect_downloads_ttl_s: int | None = None
    settings: GatewaySettings = field(default_factory=GatewaySettings)
    chat: ChatService | None = None  # type: ignore[assignment]
    store: ArtifactStore | None = None  # type: ignore[assignment]
    decoders: DecoderQueue | None = None  # type: ignore[assignment]
    keys: ApiKeys = field(default_factory=lambda: ApiKeys(None))
    signer: UrlSigner = field(default_factory=lambda: UrlSigner(None, 3600))
    on_startup: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)
    on_shutdown: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)
    registry: CollectorRegistry | None = None
    metrics: GatewayMetrics | None = None
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(None))
    streams: StreamHub = field(default_factory=lambda: StreamHub(MemoryEventLog(20_000, 300), grace_s=10.0))
