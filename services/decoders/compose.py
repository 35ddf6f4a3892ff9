"""Build a DecoderRunner from settings: pipelines for the worker's queues, the artifact store, the job book."""

from __future__ import annotations

from services.bundle.loader import Bundle
from services.contracts.bundle_manifest import Modality
from services.contracts.settings import Settings
from services.decoders.pipelines import DecoderPipelines
from services.decoders.runner import DecoderRunner
from services.jobs.book import JobBook
from services.storage import build_artifact_store


def build_runner(settings: Settings, bundle: Bundle, modalities: list[Modality], book: JobBook) -> DecoderRunner:
    pipelines = DecoderPipelines(bundle, modalities, settings.decoders.device)
    return DecoderRunner(pipelines, build_artifact_store(settings), book, bundle.manifest,
                         time_limit_s=settings.decoders.time_limit_s, lock_ttl_s=settings.decoders.lock_ttl_s,
                         max_pixels=settings.decoders.max_pixels_per_job)
