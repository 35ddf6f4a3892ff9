"""The Celery worker app: one task, ``nextgpt.decode``, routed to a queue per modality. The task body only
translates between Celery and ``DecoderRunner``; retries happen for transient I/O errors only."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from pydantic import ValidationError

from services.contracts.celery_config import DECODE_TASK, celery_config
from services.contracts.decoders import DecodeJob, JobEvent
from services.contracts.settings import Settings
from services.decoders.runner import DecoderRunner, DeviceBrokenError, JobBusyError, PoisonJobError, TransientJobError

log = logging.getLogger(__name__)


EXIT_DEVICE_BROKEN = 70  # EX_SOFTWARE: a supervisor restarts the worker


def make_worker_app(settings: Settings, runner: Callable[[], DecoderRunner]) -> Celery:
    """``runner`` builds (once, on the first task) the runner with its pipelines loaded."""
    app = Celery("nextgpt")
    app.conf.update(celery_config(settings))
    built: dict[str, DecoderRunner] = {}

    def get_runner() -> DecoderRunner:
        if "runner" not in built:
            built["runner"] = runner()
        return built["runner"]

    app.nextgpt_runner = get_runner  # type: ignore[attr-defined]

    @app.task(name=DECODE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
              max_retries=settings.decoders.max_retries)
    def decode(self: Task, payload: dict[str, Any]) -> dict[str, Any] | None:
        try:
            job = DecodeJob.model_validate(payload)
        except ValidationError as exc:
            log.error("dropping malformed decode job: %s", exc)
            return None
        current = get_runner()
        try:
            info = current.run(job)
        except DeviceBrokenError as exc:
            # Unacknowledged (acks_late), the job goes to another worker; this process cannot run anything more.
            log.critical("job %s: %s; exiting so the supervisor restarts this worker", job.job_id, exc)
            logging.shutdown()
            os._exit(EXIT_DEVICE_BROKEN)
        except PoisonJobError as exc:
            log.warning("job %s failed: %s", job.job_id, exc)
            current.book.publish(JobEvent(job_id=job.job_id, type="failed", error=str(exc)), job.modality)
            return None
        except TransientJobError as exc:
            if self.request.retries >= self.max_retries and not isinstance(exc, JobBusyError):
                current.book.publish(JobEvent(job_id=job.job_id, type="failed", error=str(exc)), job.modality)
                return None
            delay = 5 if isinstance(exc, JobBusyError) else min(60, 2 ** (self.request.retries + 1))
            log.warning("job %s: %s; retry in %s s", job.job_id, exc, delay)
            raise self.retry(exc=exc, countdown=delay, max_retries=None if isinstance(exc, JobBusyError) else self.max_retries)
        return info.model_dump(mode="json") if info else None

    return app
