"""``DecoderQueue`` in one process (embedded mode): the same runner and job semantics as the Celery workers,
on a local worker thread, with a bounded number of queued jobs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from services.contracts.decoders import TERMINAL_STATES, DecodeJob, DecoderQueue, JobEvent, JobStatus
from services.contracts.errors import ServiceUnavailableError
from services.decoders.runner import DecoderRunner, DeviceBrokenError, JobBusyError, PoisonJobError, TransientJobError
from services.jobs.book import MemoryJobBook

log = logging.getLogger(__name__)


class LocalDecoderQueue(DecoderQueue):
    def __init__(self, runner: DecoderRunner, book: MemoryJobBook, max_queued: int = 64, max_retries: int = 3,
                 idle_timeout_s: float = 3600.0) -> None:
        self.runner, self.book = runner, book
        self.max_queued, self.max_retries, self.idle_timeout_s = max_queued, max_retries, idle_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder")
        self._active: set[str] = set()
        self._lock = threading.Lock()
        # Registered first, so a job leaves the count before any reader hears of its end.
        self.book.listeners.insert(0, self._on_event)

    def _on_event(self, event: JobEvent) -> None:
        if event.type in TERMINAL_STATES:
            with self._lock:
                self._active.discard(event.job_id)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, job: DecodeJob) -> None:
        with self._lock:
            if len(self._active) >= self.max_queued:
                raise ServiceUnavailableError(f"{len(self._active)} decode jobs are waiting; retry later",
                                              code="overloaded")
            self._active.add(job.job_id)
        self.book.publish(JobEvent(job_id=job.job_id, type="queued", owner=job.owner), job.modality)
        self._executor.submit(self._work, job)

    def _work(self, job: DecodeJob) -> None:
        try:
            for attempt in range(self.max_retries + 1):
                try:
                    self.runner.run(job)
                    return
                except PoisonJobError as exc:
                    self._fail(job, str(exc))
                    return
                except DeviceBrokenError as exc:
                    # Nothing more can run in this process: fail the job, and stop the server (SIGTERM: a
                    # graceful shutdown) so its supervisor starts a fresh one.
                    self._fail(job, str(exc))
                    log.critical("%s; stopping the server so that it is restarted", exc)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                except TransientJobError as exc:
                    if attempt == self.max_retries or isinstance(exc, JobBusyError):
                        self._fail(job, str(exc))
                        return
                    time.sleep(min(30, 2 ** attempt))
        except Exception as exc:  # never let one job kill the worker thread
            log.exception("decode job %s crashed", job.job_id)
            self._fail(job, f"internal error: {type(exc).__name__}")

    def _fail(self, job: DecodeJob, error: str) -> None:
        self.book.publish(JobEvent(job_id=job.job_id, type="failed", error=error), job.modality)

    async def status(self, job_id: str) -> JobStatus | None:
        return self.book.status(job_id)

    async def cancel(self, job_id: str) -> None:
        self.book.cancel(job_id)

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def listener(event: JobEvent) -> None:
            if event.job_id == job_id:
                loop.call_soon_threadsafe(wake.set)

        self.book.listeners.append(listener)
        try:
            seen = 0
            while True:
                wake.clear()
                events = self.book.events(job_id)
                for event in events[seen:]:
                    yield event
                    if event.type in TERMINAL_STATES:
                        return
                seen = len(events)
                try:
                    await asyncio.wait_for(wake.wait(), self.idle_timeout_s)
                except TimeoutError:
                    return
        finally:
            self.book.listeners.remove(listener)
