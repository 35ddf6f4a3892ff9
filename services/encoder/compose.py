"""Build an EncoderService from settings and a bundle (the heavy part: loads ImageBind)."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry

from services.bundle.loader import Bundle
from services.contracts.settings import EncoderSettings
from services.contracts.storage import ArtifactStore
from services.encoder.metrics import EncoderMetrics
from services.encoder.model import EncoderModel
from services.encoder.serving import EncoderService


def build_encoder_service(bundle: Bundle, settings: EncoderSettings, registry: CollectorRegistry,
                          store: ArtifactStore | None = None) -> EncoderService:
    model = EncoderModel.from_bundle(bundle, device=settings.device, dtype=getattr(torch, settings.dtype))
    return EncoderService(model, settings, EncoderMetrics(registry), store)
