"""``DecoderQueue`` over Celery + Redis: what the gateway uses in distributed mode (no decoder code, no torch)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
from celery import Celery

from services.contracts.celery_config import DECODE_TASK, celery_config
from services.contracts.decoders import DecodeJob, DecoderQueue, JobEvent, JobStatus
from services.contracts.errors import ServiceUnavailableError
from services.contracts.settings import Settings
from services.jobs.book import RedisJobBook
from services.jobs.reader import AsyncJobReader


def make_client_app(settings: Settings) -> Celery:
    app = Celery("nextgpt-client")
    app.conf.update(celery_config(settings))
    return app


class CeleryDecoderQueue(DecoderQueue):
    def __init__(self, app: Celery, book: RedisJobBook, reader: AsyncJobReader) -> None:
        self.app, self.book, self.reader = app, book, reader

    async def submit(self, job: DecodeJob) -> None:
        def send() -> None:
            self.book.publish(JobEvent(job_id=job.job_id, type="queued", owner=job.owner), job.modality)
            self.app.send_task(DECODE_TASK, args=[job.model_dump(mode="json")], queue=job.modality,
                               task_id=job.job_id)

        try:
            await anyio.to_thread.run_sync(send)
        except Exception as exc:  # broker down: the caller gets a 503, not a hang
            raise ServiceUnavailableError(f"decoder queue unavailable: {exc}", code="queue_unavailable") from exc

    async def status(self, job_id: str) -> JobStatus | None:
        return await self.reader.status(job_id)

    async def cancel(self, job_id: str) -> None:
        await self.reader.cancel(job_id)

    def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        return self.reader.events(job_id)


def redis_clients(settings: Settings) -> tuple[Any, Any]:
    from services.jobs.redis_clients import async_redis, sync_redis

    return sync_redis(settings.redis.url), async_redis(settings.redis.url, settings.redis.max_connections)
