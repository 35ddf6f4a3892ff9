"""Resumable chat streams. A chat turn runs as a producer that writes its events to a bounded log; HTTP responses
are readers of that log. A client that loses its connection reconnects with ``Last-Event-ID`` and gets the rest
(replayed, then live). A stream nobody reads for ``grace_s`` is cancelled (generation and decode jobs), which is
the "client went away" path. The log is in memory (embedded mode) or in Redis (distributed mode: a client may
reconnect through another gateway replica)."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Gauge

from gateway.turn_events import TurnEvent, wire
from services.contracts.errors import GoneError, InvalidRequestError, NextGPTError, NotFoundError

log = logging.getLogger(__name__)
LogEntry = tuple[int, str, dict[str, Any]]  # (event id, name, data)
END = "_end"


class EventLog(abc.ABC):
    @abc.abstractmethod
    async def create(self, stream_id: str, owner: str | None) -> None: ...

    @abc.abstractmethod
    async def owner(self, stream_id: str) -> tuple[bool, str | None]:
        """(exists, owner)."""

    @abc.abstractmethod
    async def append(self, stream_id: str, event_id: int, name: str, data: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def first_id(self, stream_id: str) -> int | None:
        """Id of the oldest entry still kept (None: none yet)."""

    @abc.abstractmethod
    async def end_id(self, stream_id: str) -> int | None:
        """The id of the stream's end marker once it has ended (one past its last event), else None."""

    @abc.abstractmethod
    def read(self, stream_id: str, after: int) -> AsyncIterator[LogEntry]:
        """Entries with id > ``after``, replayed then followed, until the end marker."""

    @abc.abstractmethod
    async def touch(self, stream_id: str, ttl_s: float) -> None:
        """A reader is attached (for ``ttl_s`` more seconds)."""

    @abc.abstractmethod
    async def attached(self, stream_id: str) -> bool: ...


@dataclass
class _MemoryStream:
    owner: str | None
    entries: list[LogEntry] = field(default_factory=list)
    dropped: int = 0  # entries trimmed from the front
    ended_at: float | None = None
    seen_until: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryEventLog(EventLog):
    def __init__(self, max_events: int, ttl_s: float, max_streams: int = 10_000) -> None:
        self.max_events, self.ttl_s, self.max_streams = max_events, ttl_s, max_streams
        self._streams: dict[str, _MemoryStream] = {}

    def _sweep(self) -> None:
        now = time.monotonic()
        for stream_id, s in list(self._streams.items()):
            if s.ended_at is not None and now - s.ended_at > self.ttl_s:
                del self._streams[stream_id]
        ended = sorted((s.ended_at, i) for i, s in self._streams.items() if s.ended_at is not None)
        while len(self._streams) > self.max_streams and ended:
            del self._streams[ended.pop(0)[1]]

    async def create(self, stream_id: str, owner: str | None) -> None:
        self._sweep()
        self._streams[stream_id] = _MemoryStream(owner)

    async def owner(self, stream_id: str) -> tuple[bool, str | None]:
        self._sweep()
        s = self._streams.get(stream_id)
        return (s is not None, s.owner if s else None)

    async def append(self, stream_id: str, event_id: int, name: str, data: dict[str, Any]) -> None:
        s = self._streams[stream_id]
        s.entries.append((event_id, name, data))
        if len(s.entries) > self.max_events:
            s.entries.pop(0)
            s.dropped += 1
        if name == END:
            s.ended_at = time.monotonic()
        s.changed.set()
        s.changed = asyncio.Event()

    async def first_id(self, stream_id: str) -> int | None:
        s = self._streams.get(stream_id)
        return s.entries[0][0] if s and s.entries else None

    async def end_id(self, stream_id: str) -> int | None:
        s = self._streams.get(stream_id)
        return s.entries[-1][0] if s and s.ended_at is not None and s.entries else None

    async def read(self, stream_id: str, after: int) -> AsyncIterator[LogEntry]:  # type: ignore[override]
        s = self._streams.get(stream_id)
        if s is None:
            raise NotFoundError(f"stream {stream_id} not found (or expired)", code="stream_not_found")
        while True:
            changed = s.changed
            # Ids are consecutive, so the entries after ``after`` start at a computable index.
            start = max(0, after - (s.entries[0][0] - 1)) if s.entries else 0
            for entry in s.entries[start:]:
                if entry[1] == END:
                    return
                after = entry[0]
                yield entry
            if s.ended_at is not None:  # ended before ``after``: nothing more will come
                return
            await changed.wait()

    async def touch(self, stream_id: str, ttl_s: float) -> None:
        s = self._streams.get(stream_id)
        if s is not None:
            s.seen_until = max(s.seen_until, time.monotonic() + ttl_s)

    async def attached(self, stream_id: str) -> bool:
        s = self._streams.get(stream_id)
        return s is not None and s.seen_until > time.monotonic()


class RedisEventLog(EventLog):
    """A Redis stream per chat stream, entry ids ``<event id>-0``, trimmed to ``max_events``, expiring ``ttl_s``
    after the last event. A Redis restart mid-stream is ridden out by the client's own retry policy
    (``services.jobs.redis_clients.async_redis``, as the job reader and the job book use)."""

    def __init__(self, redis: Any, key_prefix: str, max_events: int, ttl_s: int, block_ms: int = 2000) -> None:
        self.r, self.prefix, self.max_events = redis, key_prefix, max_events
        self.ttl_s, self.block_ms = ttl_s, block_ms

    def _key(self, stream_id: str, part: str = "") -> str:
        return f"{self.prefix}chatstream:{stream_id}{part}"

    async def create(self, stream_id: str, owner: str | None) -> None:
        await self.r.set(self._key(stream_id, ":owner"), json.dumps(owner), ex=self.ttl_s)

    async def owner(self, stream_id: str) -> tuple[bool, str | None]:
        raw = await self.r.get(self._key(stream_id, ":owner"))
        return (False, None) if raw is None else (True, json.loads(raw))

    async def append(self, stream_id: str, event_id: int, name: str, data: dict[str, Any]) -> None:
        key = self._key(stream_id)

        async def write() -> None:
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.xadd(key, {"name": name, "data": json.dumps(data, separators=(",", ":"))},
                          id=f"{event_id}-0", maxlen=self.max_events, approximate=False)
                pipe.expire(key, self.ttl_s)
                pipe.expire(self._key(stream_id, ":owner"), self.ttl_s)
                await pipe.execute()

        await write()

    async def first_id(self, stream_id: str) -> int | None:
        first = await self.r.xrange(self._key(stream_id), count=1)
        return int(first[0][0].split(b"-")[0]) if first else None

    async def end_id(self, stream_id: str) -> int | None:
        last = await self.r.xrevrange(self._key(stream_id), count=1)
        if last and last[0][1][b"name"].decode() == END:
            return int(last[0][0].split(b"-")[0])
        return None

    async def read(self, stream_id: str, after: int) -> AsyncIterator[LogEntry]:  # type: ignore[override]
        key = self._key(stream_id)
        last = f"{after}-0"
        while True:
            reply = await self.r.xread({key: last}, block=self.block_ms, count=200)
            # The owner key lives from create() on and is refreshed by every append (the stream key only exists
            # after the first event, which may take a while under load).
            if not reply and not await self.r.exists(self._key(stream_id, ":owner")):
                # Expired (its producer died without an end marker, or it outlived replay_ttl_s): never wait forever.
                raise GoneError(f"stream {stream_id} ended without finishing (or expired)", code="stream_gone")
            if not reply and await self.end_id(stream_id) is not None:  # ended before ``after``
                return
            for _key, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    name = fields[b"name"].decode()
                    if name == END:
                        return
                    yield int(last.split("-")[0]), name, json.loads(fields[b"data"])

    async def touch(self, stream_id: str, ttl_s: float) -> None:
        await self.r.set(self._key(stream_id, ":reader"), "1", px=max(1, int(ttl_s * 1000)))

    async def attached(self, stream_id: str) -> bool:
        return bool(await self.r.exists(self._key(stream_id, ":reader")))


class StreamHub:
    """Runs chat turns as producers into an EventLog and attaches readers to them."""

    def __init__(self, events: EventLog, grace_s: float, touch_every_s: float = 1.0,
                 active: Gauge | None = None) -> None:
        self.log, self.grace_s, self.touch_every_s, self.active = events, grace_s, touch_every_s, active
        self._producers: set[asyncio.Task[None]] = set()

    @property
    def _reader_ttl_s(self) -> float:
        # A reader refreshes every touch_every_s; the stream counts as read for grace_s after the last refresh.
        return self.grace_s + 2 * self.touch_every_s

    async def start(self, events: AsyncIterator[TurnEvent], owner: str | None) -> str:
        stream_id = uuid.uuid4().hex
        await self.log.create(stream_id, owner)
        await self.log.touch(stream_id, self._reader_ttl_s)
        task = asyncio.create_task(self._produce(stream_id, events), name=f"chat-stream-{stream_id}")
        self._producers.add(task)
        task.add_done_callback(self._producers.discard)
        return stream_id

    async def _produce(self, stream_id: str, events: AsyncIterator[TurnEvent]) -> None:
        next_id = 0

        async def emit(name: str, data: dict[str, Any]) -> None:
            nonlocal next_id
            next_id += 1
            await self.log.append(stream_id, next_id, name, data)

        async def pump() -> None:
            try:
                async for event in events:
                    shown = wire(event)
                    if shown is not None:  # internal events never reach the log
                        await emit(*shown)
            except NextGPTError as exc:
                await emit("error", exc.to_response().model_dump())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("chat stream %s failed", stream_id)
                await emit("error", {"error": {"type": "internal_error", "code": "internal_error",
                                               "message": "the request failed", "param": None}})
            finally:
                await events.aclose()  # type: ignore[attr-defined]

        async def watch() -> None:
            while await self.log.attached(stream_id):
                await asyncio.sleep(self.touch_every_s)

        pumping = asyncio.create_task(pump())
        watching = asyncio.create_task(watch())
        if self.active is not None:
            self.active.inc()
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not pumping.done():
                # Nobody read the stream for grace_s: the client is gone. Closing the turn cancels the generation
                # and its decode jobs.
                log.info("chat stream %s has no reader for %.1f s: cancelling it", stream_id, self.grace_s)
                pumping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pumping
                await emit("error", {"error": {"type": "client_gone", "code": "stream_abandoned", "param": None,
                                               "message": "no client read this stream; it was cancelled"}})
        except Exception:
            log.exception("chat stream %s: producer failed", stream_id)
        finally:
            watching.cancel()
            if self.active is not None:
                self.active.dec()
            with contextlib.suppress(Exception):
                await self.log.append(stream_id, next_id + 1, END, {})

    async def attach(self, stream_id: str, owner: str | None, after: int = 0) -> AsyncIterator[LogEntry]:
        exists, stream_owner = await self.log.owner(stream_id)
        if not exists or stream_owner != owner:
            raise NotFoundError(f"stream {stream_id} not found (or expired)", code="stream_not_found")
        end = await self.log.end_id(stream_id)
        if end is not None and after >= end:
            raise InvalidRequestError(f"stream {stream_id} ended at event {end - 1}; there is no event {after}",
                                      code="invalid_event_id", param="Last-Event-ID")
        first = await self.log.first_id(stream_id)
        if first is not None and first > after + 1:
            raise GoneError(f"events {after + 1}..{first - 1} of stream {stream_id} are past the replay window",
                            code="replay_window_passed")
        # Touch now, not at the first event: the producer must see this reader even before anything arrives.
        await self.log.touch(stream_id, self._reader_ttl_s)
        return self._follow(stream_id, self.log.read(stream_id, after))

    async def _follow(self, stream_id: str, reader: AsyncIterator[LogEntry]) -> AsyncIterator[LogEntry]:
        async def keep_touching() -> None:
            while True:
                with contextlib.suppress(Exception):
                    await self.log.touch(stream_id, self._reader_ttl_s)
                await asyncio.sleep(self.touch_every_s)

        toucher = asyncio.create_task(keep_touching())
        try:
            async for entry in reader:
                yield entry
        finally:
            toucher.cancel()
            await reader.aclose()  # type: ignore[attr-defined]

    async def close(self) -> None:
        for task in list(self._producers):
            task.cancel()
        for task in list(self._producers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

