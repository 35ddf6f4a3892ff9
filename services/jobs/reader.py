"""Async reading of a job's status and events from Redis (the gateway side of the job book)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.contracts.decoders import TERMINAL_STATES, JobEvent, JobStatus
from services.contracts.job_keys import cancel_key, events_key, status_key
from services.jobs.book import JOB_TTL_S

log = logging.getLogger(__name__)


@dataclass
class _Follower:
    last: str = "0-0"  # the last entry id delivered to this follower
    inbox: asyncio.Queue[JobEvent | BaseException] = field(default_factory=asyncio.Queue)


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class AsyncJobReader:
    """Every job this process follows is read by one loop: one blocking read over all their event streams, whatever
    their number (a chat stream with several media jobs holds no Redis connection of its own). The loop runs while
    someone follows a job; a newly followed job joins it within ``block_ms``."""

    # The blocking read stays well under redis-py's socket timeout (5 s by default here), or every quiet
    # moment of a long decode would read as a broken connection; and short, as new jobs join at its end.
    def __init__(self, client: Any, prefix: str, block_ms: int = 100, max_failures: int = 20) -> None:
        self.r, self.prefix, self.block_ms, self.max_failures = client, prefix, block_ms, max_failures
        self._followers: dict[str, list[_Follower]] = {}
        self._loop: tuple[asyncio.AbstractEventLoop, asyncio.Task[None]] | None = None

    async def status(self, job_id: str) -> JobStatus | None:
        raw = await self.r.get(status_key(self.prefix, job_id))
        return JobStatus.model_validate_json(raw) if raw else None

    async def cancel(self, job_id: str) -> None:
        await self.r.set(cancel_key(self.prefix, job_id), "1", ex=JOB_TTL_S)

    async def events(self, job_id: str, idle_timeout_s: float = 3600.0) -> AsyncIterator[JobEvent]:
        """Every event from the first, waiting for new ones, until a terminal event (or ``idle_timeout_s`` with
        no event at all, so a lost job cannot hold a reader forever)."""
        key, follower = events_key(self.prefix, job_id), _Follower()
        self._followers.setdefault(key, []).append(follower)
        self._ensure_loop()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(follower.inbox.get(), idle_timeout_s)
                except TimeoutError:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.type in TERMINAL_STATES:
                    return
        finally:
            followers = self._followers.get(key, [])
            if follower in followers:
                followers.remove(follower)
            if not followers:
                self._followers.pop(key, None)

    def _ensure_loop(self) -> None:
        running = asyncio.get_running_loop()
        if self._loop is None or self._loop[0] is not running or self._loop[1].done():
            self._loop = (running, running.create_task(self._read_all(), name="job-events"))

    async def _read_all(self) -> None:
        failures = 0
        while self._followers:
            # Each stream from its least advanced follower (a new one starts from the first event).
            cursors = {key: min((f.last for f in followers), key=_entry_key)
                       for key, followers in self._followers.items() if followers}
            try:
                reply = await self.r.xread(cursors, block=self.block_ms, count=100)
                failures = 0
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # Redis restarting or a slow moment: pick up from the last events seen, a bounded number of times.
                failures += 1
                if failures > self.max_failures:
                    for followers in self._followers.values():
                        for follower in followers:
                            follower.inbox.put_nowait(exc)
                    return
                log.warning("reading job events failed (%s); retrying", exc)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** failures))
                continue
            for stream, entries in reply or []:
                key = stream.decode() if isinstance(stream, bytes) else stream
                for entry_id, fields in entries:
                    entry = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    event = JobEvent.model_validate_json(fields[b"event"] if b"event" in fields else fields["event"])
                    for follower in self._followers.get(key, []):
                        # Only a follower this read started at or before: one that joined while it was in flight
                        # is behind it and catches up from its own position in the next round, without a gap.
                        if _entry_key(cursors[key]) <= _entry_key(follower.last) < _entry_key(entry):
                            follower.last = entry
                            follower.inbox.put_nowait(event)
