"""``DecoderQueue`` over Celery + Redis: what the gateway uses in distributed mode (no decoder code, no torch)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

import anyio
from celery import Celery

from services.contracts.celery_config import DECODE_TASK, celery_config
from services.contracts.decoders import DecodeJob, DecoderQueue, JobEvent, JobStatus
from services.contracts.errors import ServiceUnavailableError
from services.contracts.settings import Settings
from services.jobs.book import RedisJobBook, fail_unclaimed
from services.jobs.reader import AsyncJobReader

log = logging.getLogger(__name__)


def make_client_app(settings: Settings) -> Celery:
    app = Celery("nextgpt-client")
    app.conf.update(celery_config(settings))
    return app


class CeleryDecoderQueue(DecoderQueue):
    """A job no worker takes within ``queue_wait_s`` (no worker for its modality, or all of them busy) fails with
    ``no_decoder_worker``, seen by whoever follows or polls it; Celery's ``expires`` makes a worker that appears
    later drop it unrun.

    A job whose worker died mid-job (killed for memory, its node gone) is queued again by whoever follows or polls
    it, once its lease has run out and it has been silent for ``lost_after_s`` (the workers' lease TTL): another
    worker takes it within seconds, where Celery would hand it out again only after its visibility timeout (an hour
    by default), its stream silent all along. Celery's own redelivery, later, finds it done or running (its
    artifact, its lease) and does nothing twice."""

    outlives_process = True

    def __init__(self, app: Celery, book: RedisJobBook, reader: AsyncJobReader, queue_wait_s: float = 600.0,
                 modalities: tuple[str, ...] = ("image", "video", "audio"), workers_ttl_s: float = 15.0,
                 lost_after_s: float = 120.0, on_lost: Callable[[str], None] | None = None) -> None:
        """``on_lost``: told what was done with each job found without its worker (``requeued``, ``failed``)."""
        self.app, self.book, self.reader, self.queue_wait_s = app, book, reader, queue_wait_s
        self.modalities, self.workers_ttl_s, self.lost_after_s = modalities, workers_ttl_s, lost_after_s
        self.on_lost = on_lost
        self._consumed: tuple[float, set[str]] | None = None  # (when asked, queues some worker consumes)

    async def check_workers(self) -> None:
        """Raise naming the modalities whose queue no worker consumes (asked of the workers at most every
        ``workers_ttl_s``: a broadcast waits its whole timeout for replies)."""
        now = time.monotonic()
        if self._consumed is None or now - self._consumed[0] > self.workers_ttl_s:
            def ask() -> set[str]:
                replies = self.app.control.inspect(timeout=1.0).active_queues() or {}
                return {queue["name"] for queues in replies.values() for queue in queues}

            self._consumed = (now, await anyio.to_thread.run_sync(ask))
        orphaned = [m for m in self.modalities if m not in self._consumed[1]]
        if orphaned:
            raise ServiceUnavailableError(f"no decoder worker consumes {', '.join(orphaned)}: such jobs fail "
                                          f"after {self.queue_wait_s:.0f} s", code="no_decoder_worker")

    async def submit(self, job: DecodeJob) -> None:
        def send() -> None:
            self.book.keep(job)
            self.book.publish(JobEvent(job_id=job.job_id, type="queued", owner=job.owner), job.modality)
            self._send(job)

        try:
            await anyio.to_thread.run_sync(send)
        except Exception as exc:  # broker down: the caller gets a 503, not a hang
            raise ServiceUnavailableError(f"decoder queue unavailable: {exc}", code="queue_unavailable") from exc

    def _send(self, job: DecodeJob) -> None:
        self.app.send_task(DECODE_TASK, args=[job.model_dump(mode="json")], queue=job.modality,
                           task_id=job.job_id, expires=self.queue_wait_s)

    async def status(self, job_id: str) -> JobStatus | None:
        status = await self.reader.status(job_id)
        if status is not None and status.state == "queued" and self._waited(status) > self.queue_wait_s:
            await self._fail_unclaimed(status)
            status = await self.reader.status(job_id)
        elif status is not None and status.state == "running" and self._waited(status) > self.lost_after_s:
            await self._requeue_if_lost(job_id)  # queued again, failed (worker_lost), or left as it is
            status = await self.reader.status(job_id)
        return status

    async def _requeue_if_lost(self, job_id: str) -> None:
        """Queue the job again when its worker is gone (``RedisJobBook.requeue_if_lost``: or fail it, when that
        keeps happening to it); a store or broker away now is tried again at the next look."""
        def requeue() -> None:
            lost = self.book.requeue_if_lost(job_id, self.lost_after_s)
            if lost is None:
                return
            outcome, job = lost
            log.warning("job %s: its worker was lost mid-job (no lease, silent for %.0f s); %s", job_id,
                        self.lost_after_s, "queued again" if outcome == "requeued" else "failed (worker_lost)")
            if outcome == "requeued":
                self._send(job)
            if self.on_lost is not None:
                self.on_lost(outcome)

        try:
            await anyio.to_thread.run_sync(requeue)
        except Exception as exc:
            log.warning("job %s: could not check or requeue it: %s", job_id, exc)

    async def cancel(self, job_id: str) -> None:
        await self.reader.cancel(job_id)

    def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        return self._events(job_id)

    async def _events(self, job_id: str) -> AsyncIterator[JobEvent]:
        source = self.reader.events(job_id)
        status = await self.reader.status(job_id)
        queued = status if status is not None and status.state == "queued" else None
        running = status is not None and status.state == "running"
        pending: asyncio.Future[JobEvent] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(source))
                if queued is not None:
                    timeout: float | None = max(0.0, self.queue_wait_s - self._waited(queued))
                else:  # a running job is looked at every half lease: is its worker still there?
                    timeout = max(1.0, self.lost_after_s / 2) if running else None
                done, _ = await asyncio.wait({pending}, timeout=timeout)
                if not done:
                    if queued is not None:
                        await self._fail_unclaimed(queued)  # its "failed" event (or the worker's) comes next
                        queued = None
                    else:
                        await self._requeue_if_lost(job_id)  # its "queued" (or "failed") event comes next
                    continue
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                running = event.type in ("started", "progress")
                if event.type == "queued" and queued is None:
                    # Queued again (its worker lost): the bound on waiting for a worker starts over.
                    again = await self.reader.status(job_id)
                    queued = again if again is not None and again.state == "queued" else None
                elif event.type != "queued":
                    queued = None
                yield event
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            await source.aclose()  # type: ignore[attr-defined]

    @staticmethod
    def _waited(status: JobStatus) -> float:
        return (datetime.now(timezone.utc) - status.updated_at).total_seconds()

    async def _fail_unclaimed(self, status: JobStatus) -> None:
        await anyio.to_thread.run_sync(fail_unclaimed, self.book, status.job_id, status.modality,
                                       self._waited(status), "no_decoder_worker")


def redis_clients(settings: Settings) -> tuple[Any, Any]:
    from services.jobs.redis_clients import async_redis, sync_redis

    return sync_redis(settings.redis.url), async_redis(settings.redis.url, settings.redis.max_connections)
