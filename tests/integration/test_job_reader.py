"""Following decode jobs from the gateway: one blocking read for every job a process follows, on a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from services.contracts.decoders import JobEvent, new_job_id
from services.jobs.book import RedisJobBook
from services.jobs.reader import AsyncJobReader
from services.jobs.redis_clients import async_redis, sync_redis
from tests.support.servers import RedisInfo


@pytest.fixture()
async def parts(redis_info: RedisInfo) -> AsyncIterator[tuple[RedisJobBook, AsyncJobReader, redis.asyncio.Redis]]:
    prefix = f"{redis_info.key_prefix}reader-{uuid.uuid4().hex[:6]}:"
    client, watcher = async_redis(redis_info.url), redis.asyncio.Redis.from_url(redis_info.url)
    book = RedisJobBook(sync_redis(redis_info.url), prefix)
    yield book, AsyncJobReader(client, prefix), watcher
    async for key in watcher.scan_iter(f"{prefix}*"):
        await watcher.delete(key)
    await client.aclose()
    await watcher.aclose()


async def _blocked_reads(client: redis.asyncio.Redis) -> int:
    listing = (await client.execute_command("CLIENT", "LIST")).decode()
    return sum(1 for line in listing.splitlines() if "cmd=xread" in line and "flags=b" in line)


async def test_many_followed_jobs_share_one_blocking_read_and_each_gets_its_own_events(parts) -> None:
    book, reader, watcher = parts
    jobs = [new_job_id() for _ in range(6)]
    for job_id in jobs:
        book.publish(JobEvent(job_id=job_id, type="queued"), "image")

    async def follow(job_id: str) -> list[JobEvent]:
        return [event async for event in reader.events(job_id)]

    followed = [asyncio.ensure_future(follow(job_id)) for job_id in jobs]
    await asyncio.sleep(0.5)
    readers = [await _blocked_reads(watcher) for _ in range(5)]
    assert max(readers) <= 1, readers  # six jobs followed, at most one connection in a blocking read
    late = asyncio.ensure_future(follow(jobs[0]))  # a second follower of one job gets it from the first event
    for step, job_id in enumerate(jobs):
        book.publish(JobEvent(job_id=job_id, type="started"), "image")
        book.publish(JobEvent(job_id=job_id, type="progress", step=step + 1, total=9), "image")
        book.publish(JobEvent(job_id=job_id, type="failed" if step == 2 else "cancelled"), "image")
    results = await asyncio.wait_for(asyncio.gather(*followed, late), 10)
    for step, (job_id, events) in enumerate(zip(jobs, results)):
        assert [e.job_id for e in events] == [job_id] * 4
        assert [e.type for e in events] == ["queued", "started", "progress", "failed" if step == 2 else "cancelled"]
        assert events[2].step == step + 1
    assert [e.type for e in results[-1]] == [e.type for e in results[0]]
    await asyncio.sleep(0.3)
    assert await _blocked_reads(watcher) == 0  # nobody follows a job: the reading loop has stopped
