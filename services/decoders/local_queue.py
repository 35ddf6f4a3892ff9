"""``DecoderQueue`` in one process (embedded mode): the same runner and job semantics as the Celery workers,
on a local worker thread, with a bounded number of queued jobs. The worker takes the oldest job together with the
queued jobs that can share its pipeline call (same modality, steps, guidance and size), up to ``max_batch``; a
job that arrives on an idle pool waits up to ``batch_wait_s`` for such batch-mates."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from collections import deque

from services.contracts.decoders import (
    TERMINAL_STATES, DecodeJob, DecoderQueue, JobEvent, JobStatus,
)
from services.contracts.errors import ServiceUnavailableError
from services.decoders.runner import DecoderRunner, DeviceBrokenError, JobBusyError, PoisonJobError, TransientJobError
from services.jobs.book import MemoryJobBook, fail_unclaimed

log = logging.getLogger(__name__)


class LocalDecoderQueue(DecoderQueue):
    def __init__(self, runner: DecoderRunner, book: MemoryJobBook, max_queued: int = 64, max_retries: int = 3,
                 idle_timeout_s: float = 3600.0, max_batch: int = 8, queue_wait_s: float = 600.0,
                 batch_wait_s: float = 0.05) -> None:
        self.runner, self.book = runner, book
        self.max_queued, self.max_retries, self.idle_timeout_s = max_queued, max_retries, idle_timeout_s
        self.max_batch, self.queue_wait_s, self.batch_wait_s = max_batch, queue_wait_s, batch_wait_s
        self._waiting: deque[tuple[float, DecodeJob]] = deque()  # (when queued, job)
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        # Registered first, so a job leaves the count before any reader hears of its end.
        self.book.listeners.insert(0, self._on_event)
        self._thread = threading.Thread(target=self._loop, name="decoder", daemon=True)
        self._thread.start()

    def _on_event(self, event: JobEvent) -> None:
        if event.type in TERMINAL_STATES:
            with self._lock:
                self._active.discard(event.job_id)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._waiting.clear()
            self._wake.notify()

    async def submit(self, job: DecodeJob) -> None:
        with self._lock:
            full = len(self._active) >= self.max_queued
            if not full:
                self._active.add(job.job_id)
        if full:
            error = ServiceUnavailableError(f"{self.max_queued} decode jobs are waiting; retry later", code="overloaded")
            # On the books as failed (outside the lock: the book's listeners take it), so that the id the turn
            # reports for this item answers GET /v1/jobs/{id} with why, as any other failed job's does.
            self.book.publish(JobEvent(job_id=job.job_id, type="failed", owner=job.owner,
                                       error=f"{error.code}: {error.message}"), job.modality)
            raise error
        self.book.publish(JobEvent(job_id=job.job_id, type="queued", owner=job.owner), job.modality)
        with self._wake:
            self._waiting.append((time.monotonic(), job))
            self._wake.notify()

    def _next_batch(self) -> list[DecodeJob] | None:
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return None
                queued_at, first = self._waiting.popleft()
            waited = time.monotonic() - queued_at
            if waited <= self.queue_wait_s:
                break
            # Waited past its bound (the pool is that far behind): it fails rather than run for nobody.
            fail_unclaimed(self.book, first.job_id, first.modality, waited, "queue_timeout")
        try:
            key = self.runner.batch_key(first)
        except Exception:  # a job the runner cannot even size goes alone (and fails there, as a job)
            return [first]
        room = min(self.max_batch, self.runner.batch_room(key))
        with self._wake:
            # Jobs sent together reach the queue a few ms apart: a job that has not yet waited batch_wait_s waits
            # for the rest (as a Celery worker's flush interval does); one queued behind a busy pool runs at once.
            deadline = queued_at + self.batch_wait_s
            while room > 1 and not self._closed and len(self._mates(key)) < room - 1 \
                    and (left := deadline - time.monotonic()) > 0:
                self._wake.wait(left)
            mates = self._mates(key)[:room - 1]
            for entry in mates:
                self._waiting.remove(entry)
        return [first, *(job for _, job in mates)]

    def _mates(self, key: tuple[object, ...]) -> list[tuple[float, DecodeJob]]:
        """The waiting jobs that can share a call with jobs of ``key`` (caller holds the lock)."""
        return [entry for entry in self._waiting if self._key(entry[1]) == key]

    def _key(self, job: DecodeJob) -> tuple[object, ...] | None:
        try:
            return self.runner.batch_key(job)
        except Exception:
            return None

    def _loop(self) -> None:
        while (jobs := self._next_batch()) is not None:
            try:
                self._work(jobs)
            except Exception:  # never let a batch kill the worker thread
                log.exception("decode batch crashed")
                for job in jobs:
                    self._fail(job, "internal error")

    def _work(self, jobs: list[DecodeJob]) -> None:
        for attempt in range(self.max_retries + 1):
            retry: list[DecodeJob] = []
            for job, outcome in zip(jobs, self.runner.run_batch(jobs), strict=True):
                if isinstance(outcome, DeviceBrokenError):
                    # Nothing more can run in this process: fail the job, and stop the server (SIGTERM: a
                    # graceful shutdown) so its supervisor starts a fresh one.
                    self._fail(job, str(outcome))
                    log.critical("%s; stopping the server so that it is restarted", outcome)
                    os.kill(os.getpid(), signal.SIGTERM)
                elif isinstance(outcome, TransientJobError) and not isinstance(outcome, JobBusyError) \
                        and attempt < self.max_retries:
                    retry.append(job)
                elif isinstance(outcome, Exception):
                    if not isinstance(outcome, (PoisonJobError, TransientJobError)):
                        log.error("decode job %s crashed: %r", job.job_id, outcome)
                    self._fail(job, str(outcome))
            if not retry:
                return
            jobs = retry
            time.sleep(min(30, 2 ** attempt))

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
                fresh, seen = self.book.events_after(job_id, seen)
                for event in fresh:
                    yield event
                    if event.type in TERMINAL_STATES:
                        return
                try:
                    await asyncio.wait_for(wake.wait(), self.idle_timeout_s)
                except TimeoutError:
                    return
        finally:
            self.book.listeners.remove(listener)
