"""Async reading of a job's status and events from Redis (the gateway side of the job book)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.contracts.decoders import TERMINAL_STATES, JobEvent, JobStatus
from services.contracts.job_keys import cancel_key, events_key, status_key
from services.jobs.book import JOB_TTL_S

log = logging.getLogger(__name__)


class AsyncJobReader:
    # The blocking read stays well under redis-py's socket timeout (5 s by default here), or every quiet
    # moment of a long decode would read as a broken connection.
    def __init__(self, client: Any, prefix: str, block_ms: int = 2000, max_failures: int = 20) -> None:
        self.r, self.prefix, self.block_ms, self.max_failures = client, prefix, block_ms, max_failures

    async def status(self, job_id: str) -> JobStatus | None:
        raw = await self.r.get(status_key(self.prefix, job_id))
        return JobStatus.model_validate_json(raw) if raw else None

    async def cancel(self, job_id: str) -> None:
        await self.r.set(cancel_key(self.prefix, job_id), "1", ex=JOB_TTL_S)

    async def events(self, job_id: str, idle_timeout_s: float = 3600.0) -> AsyncIterator[JobEvent]:
        """Every event from the first, blocking for new ones, until a terminal event (or ``idle_timeout_s`` with
        no event at all, so a lost job cannot hold a reader forever)."""
        key, last, idle, failures = events_key(self.prefix, job_id), "0-0", 0.0, 0
        while True:
            try:
                reply = await self.r.xread({key: last}, block=self.block_ms, count=100)
                failures = 0
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # Redis restarting or a slow moment: pick up from the last event seen, a bounded number of times.
                failures += 1
                if failures > self.max_failures:
                    raise
                log.warning("job %s: reading events failed (%s); retrying", job_id, exc)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** failures))
                continue
            if not reply:
                idle += self.block_ms / 1000
                if idle >= idle_timeout_s:
                    return
                continue
            idle = 0.0
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    event = JobEvent.model_validate_json(fields[b"event"] if b"event" in fields else fields["event"])
                    yield event
                    if event.type in TERMINAL_STATES:
                        return
