"""Async reading of a job's status and events from Redis (the gateway side of the job book)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from services.contracts.decoders import TERMINAL_STATES, JobEvent, JobStatus
from services.contracts.job_keys import cancel_key, events_key, status_key
from services.jobs.book import JOB_TTL_S


class AsyncJobReader:
    def __init__(self, client: Any, prefix: str, block_ms: int = 5000) -> None:
        self.r, self.prefix, self.block_ms = client, prefix, block_ms

    async def status(self, job_id: str) -> JobStatus | None:
        raw = await self.r.get(status_key(self.prefix, job_id))
        return JobStatus.model_validate_json(raw) if raw else None

    async def cancel(self, job_id: str) -> None:
        await self.r.set(cancel_key(self.prefix, job_id), "1", ex=JOB_TTL_S)

    async def events(self, job_id: str, idle_timeout_s: float = 3600.0) -> AsyncIterator[JobEvent]:
        """Every event from the first, blocking for new ones, until a terminal event (or ``idle_timeout_s`` with
        no event at all, so a lost job cannot hold a reader forever)."""
        key, last, idle = events_key(self.prefix, job_id), "0-0", 0.0
        while True:
            reply = await self.r.xread({key: last}, block=self.block_ms, count=100)
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
