"""The Celery worker app: one task, ``nextgpt.decode``, routed to a queue per modality.

The task is a ``celery_batches.Batches`` task: the worker takes up to ``decoders.max_batch`` queued messages (or
what arrived within ``decoders.batch_wait_s``) as one list and hands them to ``DecoderRunner.run_batch``, which runs
jobs of one modality, steps, guidance and size as one pipeline call and keeps everything else per job. The task body
only translates between Celery and the runner: one outcome per message. Messages are acknowledged after the batch
(acks_late): a worker that dies mid-batch leaves them all to another worker. Transient I/O errors are retried by
sending the job again with a countdown (a batch task cannot ``self.retry`` one of its messages).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery_batches import Batches, SimpleRequest
from pydantic import ValidationError

from services.contracts.celery_config import DECODE_TASK, celery_config
from services.contracts.decoders import ArtifactInfo, DecodeJob, JobEvent
from services.contracts.settings import Settings
from services.decoders.runner import DecoderRunner, DeviceBrokenError, JobBusyError, Outcome, PoisonJobError, \
    TransientJobError

log = logging.getLogger(__name__)


EXIT_DEVICE_BROKEN = 70  # EX_SOFTWARE: a supervisor restarts the worker
ATTEMPT = "attempt"  # the kwarg a re-sent job carries: how many times it was retried


def make_worker_app(settings: Settings, runner: Callable[[], DecoderRunner]) -> Celery:
    """``runner`` builds (once, on the first batch) the runner with its pipelines loaded."""
    app = Celery("nextgpt")
    app.conf.update(celery_config(settings))
    built: dict[str, DecoderRunner] = {}
    max_retries = settings.decoders.max_retries

    def get_runner() -> DecoderRunner:
        if "runner" not in built:
            built["runner"] = runner()
        return built["runner"]

    app.nextgpt_runner = get_runner  # type: ignore[attr-defined]

    @app.task(name=DECODE_TASK, base=Batches, flush_every=settings.decoders.max_batch,
              flush_interval=settings.decoders.batch_wait_s, acks_late=True, reject_on_worker_lost=True)
    def decode(requests: list[SimpleRequest]) -> None:
        jobs: list[tuple[SimpleRequest, DecodeJob]] = []
        for request in requests:
            try:
                jobs.append((request, DecodeJob.model_validate(request.args[0] if request.args else None)))
            except ValidationError as exc:
                log.error("dropping malformed decode job %s: %s", request.id, exc)
                record(request, None)
        if not jobs:
            return
        log.info("took %d job(s): %s", len(jobs), " ".join(f"{job.modality}[{job.job_id}]" for _, job in jobs))
        current = get_runner()
        outcomes = current.run_batch([job for _, job in jobs])
        for (request, job), outcome in zip(jobs, outcomes, strict=True):
            settle(request, job, outcome, current)

    def settle(request: SimpleRequest, job: DecodeJob, outcome: Outcome, current: DecoderRunner) -> None:
        if isinstance(outcome, DeviceBrokenError):
            # The batch's messages stay unacknowledged (acks_late): they go to another worker, and the jobs that
            # did finish here are found done there (their artifacts exist). This process cannot run anything more.
            log.critical("job %s: %s; exiting so the supervisor restarts this worker", job.job_id, outcome)
            logging.shutdown()
            os._exit(EXIT_DEVICE_BROKEN)
        if isinstance(outcome, PoisonJobError):
            log.warning("job %s failed: %s", job.job_id, outcome)
            current.book.publish(JobEvent(job_id=job.job_id, type="failed", error=str(outcome)), job.modality)
        elif isinstance(outcome, TransientJobError):
            attempt = int((request.kwargs or {}).get(ATTEMPT, 0))
            busy = isinstance(outcome, JobBusyError)  # another delivery runs it: wait for it, without limit
            if attempt >= max_retries and not busy:
                current.book.publish(JobEvent(job_id=job.job_id, type="failed", error=str(outcome)), job.modality)
            else:
                delay = 5 if busy else min(60, 2 ** (attempt + 1))
                log.warning("job %s: %s; retry in %s s", job.job_id, outcome, delay)
                # The same task id: the job book, the lease and the artifact key make a duplicate harmless.
                app.send_task(DECODE_TASK, args=list(request.args), kwargs={ATTEMPT: attempt + (not busy)},
                              queue=job.modality, task_id=request.id, countdown=delay)
                return
        elif isinstance(outcome, Exception):
            log.error("job %s crashed: %r", job.job_id, outcome)
            current.book.publish(JobEvent(job_id=job.job_id, type="failed", error="internal error"), job.modality)
        result: dict[str, Any] | None = outcome.model_dump(mode="json") if isinstance(outcome, ArtifactInfo) else None
        record(request, result)

    def record(request: SimpleRequest, result: dict[str, Any] | None) -> None:
        # Celery's own result, for its tooling (the gateway reads the job book): never worth failing the batch for.
        try:
            app.backend.mark_as_done(request.id, result, request=request)
        except Exception as exc:
            log.warning("decode %s: result not recorded: %s", request.id, exc)

    return app
