"""Build a DecoderRunner from settings: pipelines for the worker's queues, the artifact store, the job book."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from services.bundle.loader import Bundle
from services.contracts.bundle_manifest import Modality
from services.contracts.settings import Settings
from services.decoders.metrics import DecoderMetrics
from services.decoders.pipeline_process import PipelineProcess
from services.decoders.pipelines import BatchGenerator, DecoderPipelines
from services.decoders.runner import DecoderRunner
from services.jobs.book import JobBook
from services.storage import build_artifact_store


def build_runner(settings: Settings, bundle: Bundle, modalities: list[Modality], book: JobBook,
                 own_process: bool = False, registry: CollectorRegistry | None = None,
                 threads_contended: int | None = None) -> DecoderRunner:
    """``own_process``: the pipelines run in a child process (``PipelineProcess``, started here, loading while the
    caller goes on), for the embedded pool and the Celery workers alike. ``registry``: where the pool's metrics
    go. ``threads_contended``: the child's threads while it is told that another process holds cores."""
    pipelines: BatchGenerator = PipelineProcess(
        bundle, modalities, settings.decoders.device, call_limit_s=settings.decoders.time_limit_s,
        threads=settings.decoders.threads, threads_contended=threads_contended) if own_process \
        else DecoderPipelines(bundle, modalities, settings.decoders.device)
    return DecoderRunner(pipelines, build_artifact_store(settings), book, bundle.manifest,
                         time_limit_s=settings.decoders.time_limit_s, lock_ttl_s=settings.decoders.lock_ttl_s,
                         max_pixels=settings.decoders.max_pixels_per_job,
                         metrics=DecoderMetrics(registry) if registry is not None else None)
