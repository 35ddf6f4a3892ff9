"""Resumable chat streams. A chat turn runs as a producer that writes its events to a bounded log; HTTP responses
are readers of that log. A client that loses its connection reconnects with ``Last-Event-ID`` and gets the rest
(replayed, then live). A stream nobody reads for ``grace_s`` is cancelled (generation and decode jobs), which is
the "client went away" path. The log is in memory (embedded mode) or in Redis (distributed mode: a client may
reconnect through another gateway replica)."""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import Gauge

from gateway.stopping import StopWatch, Stopped, server_stopping
from gateway.store_errors import STORE_DOWN, store_unavailable
from gateway.turn_events import ArtifactCompleted, TurnEvent, wire
from services.contracts.errors import GoneError, InvalidRequestError, NextGPTError, NotFoundError

log = logging.getLogger(__name__)
LogEntry = tuple[int, str, dict[str, Any]]  # (event id, name, data)
END = "_end"
# Redis work of a stream that no one waits for at that moment (the owner key as a turn starts, the first event's
# write) is put off this long, so that the work someone waits for (the LLM request, the client's first token)
# goes first on this process's event loop.
OFF_PATH_DELAY_S = 0.001
READ_BATCH = 256


@dataclass(frozen=True)
class StreamState:
    exists: bool
    owner: str | None = None
    first_id: int | None = None  # the oldest entry still kept (None: none yet)
    end_id: int | None = None  # one past the last event once the stream has ended, else None


StopReason = Literal["cancelled", "abandoned"]


class EventLog(abc.ABC):
    @abc.abstractmethod
    async def create(self, stream_id: str, owner: str | None, reader_ttl_s: float) -> None:
        """A new stream, counted as read for ``reader_ttl_s`` (its first reader is on its way)."""

    async def published(self, stream_id: str) -> None:
        """Until a stream made by ``create`` can be found by readers elsewhere (at once where there are none)."""

    @abc.abstractmethod
    async def state(self, stream_id: str) -> StreamState:
        """What a reader attaching needs to know, read at once."""

    @abc.abstractmethod
    async def append(self, stream_id: str, event_id: int, name: str, data: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def read(self, stream_id: str, after: int, idle_s: float | None = None) -> AsyncIterator[list[LogEntry]]:
        """Entries with id > ``after``, replayed then followed, until the end marker: in batches of what is there
        at once (at most ``READ_BATCH``), and an empty batch after ``idle_s`` with nothing new (None: no empty
        batches). A reader takes what piled up in one go, and waits on the log itself, in the caller's task."""

    @abc.abstractmethod
    async def touch(self, stream_id: str, ttl_s: float) -> None:
        """A reader is attached (for ``ttl_s`` more seconds)."""

    @abc.abstractmethod
    async def request_cancel(self, stream_id: str) -> None:
        """A client asked to cancel the stream (its producer may run on another replica)."""

    @abc.abstractmethod
    async def stop_reason(self, stream_id: str, wait_s: float) -> StopReason | None:
        """Asked by the producer, again and again while its turn runs: why the turn must stop ("cancelled": a
        client asked; "abandoned": no reader has touched the stream for a while), or None; waits up to ``wait_s``
        for a cancel made here."""


@dataclass
class _MemoryStream:
    owner: str | None
    entries: list[LogEntry] = field(default_factory=list)
    dropped: int = 0  # entries trimmed from the front
    bytes: int = 0  # what its entries weigh (``_weight``)
    ended_at: float | None = None
    seen_until: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: asyncio.Event = field(default_factory=asyncio.Event)


def _weight(name: str, data: Any) -> int:
    """About what an entry holds in memory: its strings' lengths (a delta's text; an inline artifact's base64, the
    one big thing an entry can carry) and a fixed share for the rest."""
    if isinstance(data, str):
        return len(data)
    if isinstance(data, dict):
        return 64 + len(name) + sum(_weight("", v) for v in data.values())
    if isinstance(data, list):
        return 16 + sum(_weight("", v) for v in data)
    return 16


class MemoryEventLog(EventLog):
    def __init__(self, max_events: int, ttl_s: float, max_streams: int = 10_000,
                 max_bytes: int = 256 * 2**20) -> None:
        """Ended streams stay replayable for ``ttl_s``, while there are at most ``max_streams`` of them and their
        entries weigh at most ``max_bytes`` together (the oldest ended go first): a stream with media inline holds
        their base64, up to ``inline_max_bytes`` each, and thousands of them would outgrow the machine's memory
        well within ``ttl_s``. Running streams are never dropped (their number is bounded by the LLM's slots)."""
        self.max_events, self.ttl_s, self.max_streams, self.max_bytes = max_events, ttl_s, max_streams, max_bytes
        self._streams: dict[str, _MemoryStream] = {}
        self.bytes = 0  # all streams' entries
        # Ended streams in the order they ended (so by end time): the sweep looks only at the oldest. It runs on
        # every create and attach, and a busy replica keeps thousands of recently ended streams, so a scan of all
        # of them was most of what starting a stream cost.
        self._ended: collections.deque[tuple[float, str]] = collections.deque()

    def _sweep(self) -> None:
        now = time.monotonic()
        while self._ended and (now - self._ended[0][0] > self.ttl_s or len(self._streams) > self.max_streams
                               or self.bytes > self.max_bytes):
            _, stream_id = self._ended.popleft()
            gone = self._streams.pop(stream_id, None)
            if gone is not None:
                self.bytes -= gone.bytes

    async def create(self, stream_id: str, owner: str | None, reader_ttl_s: float) -> None:
        self._sweep()
        self._streams[stream_id] = _MemoryStream(owner, seen_until=time.monotonic() + reader_ttl_s)

    def has(self, stream_id: str) -> bool:
        return stream_id in self._streams

    async def state(self, stream_id: str) -> StreamState:
        self._sweep()
        s = self._streams.get(stream_id)
        if s is None:
            return StreamState(False)
        return StreamState(True, s.owner, s.entries[0][0] if s.entries else None,
                           s.entries[-1][0] if s.ended_at is not None and s.entries else None)

    async def append(self, stream_id: str, event_id: int, name: str, data: dict[str, Any]) -> None:
        s = self._streams[stream_id]
        s.entries.append((event_id, name, data))
        weight = _weight(name, data)
        if len(s.entries) > self.max_events:
            _, old_name, old_data = s.entries.pop(0)
            s.dropped += 1
            weight -= _weight(old_name, old_data)
        s.bytes += weight
        self.bytes += weight
        if name == END and s.ended_at is None:
            s.ended_at = time.monotonic()
            self._ended.append((s.ended_at, stream_id))
            self._sweep()  # a big stream that just ended may put the log over max_bytes: older ones make room
        s.changed.set()
        s.changed = asyncio.Event()

    async def read(self, stream_id: str, after: int,  # type: ignore[override]
                   idle_s: float | None = None) -> AsyncIterator[list[LogEntry]]:
        s = self._streams.get(stream_id)
        if s is None:
            raise NotFoundError(f"stream {stream_id} not found (or expired)", code="stream_not_found")
        while True:
            changed = s.changed
            # Ids are consecutive, so the entries after ``after`` start at a computable index.
            start = max(0, after - (s.entries[0][0] - 1)) if s.entries else 0
            batch = s.entries[start:start + READ_BATCH]
            if batch:  # more may come (the end included) while the reader holds these: it looks again after
                end = next((i for i, entry in enumerate(batch) if entry[1] == END), None)
                if end is not None:
                    if end:
                        yield batch[:end]
                    return
                after = batch[-1][0]
                yield batch
                continue
            if s.ended_at is not None:  # ended before ``after``: nothing more will come
                return
            try:
                async with asyncio.timeout(idle_s):
                    await changed.wait()
            except TimeoutError:
                yield []

    async def touch(self, stream_id: str, ttl_s: float) -> None:
        s = self._streams.get(stream_id)
        if s is not None:
            s.seen_until = max(s.seen_until, time.monotonic() + ttl_s)

    def attached(self, stream_id: str) -> bool:
        s = self._streams.get(stream_id)
        return s is not None and s.seen_until > time.monotonic()

    async def request_cancel(self, stream_id: str) -> None:
        s = self._streams.get(stream_id)
        if s is not None:
            s.cancel.set()

    async def cancel_requested(self, stream_id: str, wait_s: float) -> bool:
        """Whether a cancel was requested, waiting up to ``wait_s`` for one."""
        s = self._streams.get(stream_id)
        if s is None:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(s.cancel.wait(), wait_s)
        return s.cancel.is_set()

    async def stop_reason(self, stream_id: str, wait_s: float) -> StopReason | None:
        if await self.cancel_requested(stream_id, wait_s):
            return "cancelled"
        return None if self.attached(stream_id) else "abandoned"


class RedisEventLog(EventLog):
    """A Redis stream per chat stream, entry ids ``<event id>-0``, trimmed to ``max_events``, expiring ``ttl_s``
    after the last event. A Redis restart mid-stream is ridden out by the client's own retry policy
    (``services.jobs.redis_clients.async_redis``, as the job reader and the job book use).

    The hot path stays off Redis where it can. A stream produced in this process is also kept in memory (``local``,
    until ``local_ttl_s`` after its end): readers on this replica follow it there, so an event reaches them
    without a round trip, and a waiting reader holds no Redis connection; their presence is known here too. Redis
    gets every event for readers on other replicas and for resumes after that: the first event is written at once,
    later ones gather for ``linger_s`` after each write and go together in the next (one write in flight per
    stream; the end is written without waiting). Without the linger a token-by-token reply was one transaction
    per token (five commands: MULTI, XADD, two EXPIREs, EXEC), most of the gateway's work per stream. A
    reader on another replica holds one connection in a blocking read, and sees events up to ``linger_s`` late.

    The owner key is the producer's lease: while its turn runs it expires ``lease_s`` after the producer last
    renewed it (every write, and every ``lease_s / 3`` in the producer's rounds when nothing is written), and only
    the end gives it ``ttl_s``. A replica that dies mid-turn (killed, out of memory, its machine gone) writes no
    end: its readers elsewhere learn so ``lease_s`` later (``stream_gone``); with ``ttl_s`` on the owner key from
    the start they waited that long (300 s by default)."""

    def __init__(self, redis: Any, key_prefix: str, max_events: int, ttl_s: int, block_ms: int = 2000,
                 local_ttl_s: float = 30.0, linger_s: float = 0.02, local_max_bytes: int = 256 * 2**20,
                 inline_max_bytes: int = 2**20, lease_s: float = 15.0) -> None:
        """``inline_max_bytes``: the largest inline artifact (its base64) an event keeps in Redis; a larger one
        is kept there with its URL only (readers here get it whole). Inline media would otherwise hold Redis memory
        that its other users (the job book, conversations) need, streams times media times up to the gateway's
        inline bound, for ``ttl_s``."""
        self.r, self.prefix, self.max_events = redis, key_prefix, max_events
        self.inline_max_bytes = inline_max_bytes
        self.ttl_s, self.block_ms, self.linger_s = ttl_s, block_ms, linger_s
        self.lease_ms = max(1, int(lease_s * 1000))
        self.local = MemoryEventLog(max_events, local_ttl_s, max_bytes=local_max_bytes)
        self._writers: dict[str, _StreamWriter] = {}

    def _key(self, stream_id: str, part: str = "") -> str:
        return f"{self.prefix}chatstream:{stream_id}{part}"

    async def create(self, stream_id: str, owner: str | None, reader_ttl_s: float) -> None:
        await self.local.create(stream_id, owner, reader_ttl_s)
        # The owner key is written while the turn starts, just after its LLM request has gone out (a Redis command
        # costs this process about as much as that request: neither waits for the other); ``published`` waits for
        # it before anyone learns the stream's id, and the first event write waits for it too (every write
        # refreshes its expiry).
        claim = json.dumps(owner)

        async def write_owner() -> None:
            await asyncio.sleep(OFF_PATH_DELAY_S)
            await self.r.set(self._key(stream_id, ":owner"), claim, px=self.lease_ms)

        owner_write = asyncio.ensure_future(write_owner())
        self._writers[stream_id] = _StreamWriter(self, stream_id, owner_write, claim)

    async def published(self, stream_id: str) -> None:
        writer = self._writers.get(stream_id)
        if writer is not None:  # none: the stream has already ended, after its writes (and so the owner key's)
            await asyncio.shield(writer.owner_write)

    async def state(self, stream_id: str) -> StreamState:
        if self.local.has(stream_id):
            return await self.local.state(stream_id)
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.get(self._key(stream_id, ":owner"))
            pipe.xrange(self._key(stream_id), count=1)
            pipe.xrevrange(self._key(stream_id), count=1)
            raw, first, last = await pipe.execute()
        if raw is None:
            return StreamState(False)
        ended = bool(last) and last[0][1][b"name"].decode() == END
        return StreamState(True, json.loads(raw), int(first[0][0].split(b"-")[0]) if first else None,
                           int(last[0][0].split(b"-")[0]) if ended else None)

    async def append(self, stream_id: str, event_id: int, name: str, data: dict[str, Any]) -> None:
        await self.local.append(stream_id, event_id, name, data)
        writer = self._writers[stream_id]
        writer.add((event_id, name, data))
        if name == END:  # the end is recorded in Redis before the producer finishes
            self._writers.pop(stream_id, None)
            await writer.drain()

    async def _write(self, stream_id: str, entries: list[LogEntry], claim: str) -> None:
        key = self._key(stream_id)
        ended = entries[-1][1] == END
        async with self.r.pipeline(transaction=True) as pipe:
            for event_id, name, data in entries:
                pipe.xadd(key, {"name": name, "data": json.dumps(self._kept(name, data), separators=(",", ":"))},
                          id=f"{event_id}-0", maxlen=self.max_events, approximate=False)
            pipe.expire(key, self.ttl_s)
            # SET, not EXPIRE: a claim that lapsed (Redis out of reach for longer than the lease) comes back.
            self._claim(pipe, stream_id, claim, ended)
            await pipe.execute()

    def _claim(self, pipe: Any, stream_id: str, claim: str, ended: bool = False) -> None:
        """Renews the producer's lease (the owner key), or once the stream has ended keeps it for ``ttl_s``."""
        if ended:
            pipe.set(self._key(stream_id, ":owner"), claim, ex=self.ttl_s)
        else:
            pipe.set(self._key(stream_id, ":owner"), claim, px=self.lease_ms)

    def _kept(self, name: str, data: dict[str, Any]) -> dict[str, Any]:
        """What Redis keeps of an event: an artifact's inline bytes only up to ``inline_max_bytes``."""
        inline = data.get("data") if name == ArtifactCompleted.name else None
        if not isinstance(inline, str) or len(inline) <= self.inline_max_bytes:
            return data
        return {**data, "data": None, "error": f"inline bytes not kept for resumes ({len(inline)} > "
                                               f"{self.inline_max_bytes}, REPLAY_INLINE_MAX_BYTES): fetch its url"}

    async def read(self, stream_id: str, after: int,  # type: ignore[override]
                   idle_s: float | None = None) -> AsyncIterator[list[LogEntry]]:
        if self.local.has(stream_id):
            async for batch in self.local.read(stream_id, after, idle_s):
                yield batch
            return
        key = self._key(stream_id)
        last = f"{after}-0"
        quiet_until = None if idle_s is None else time.monotonic() + idle_s  # the next empty batch
        while True:
            block = self.block_ms if quiet_until is None else \
                max(1, min(self.block_ms, math.ceil((quiet_until - time.monotonic()) * 1000)))
            reply = await self.r.xread({key: last}, block=block, count=READ_BATCH)
            if not reply:
                # The owner key lives from create() on and is refreshed by every write (the stream key only exists
                # after the first event, which may take a while under load).
                if not await self.r.exists(self._key(stream_id, ":owner")):
                    # The producer's lease lapsed (its replica died without writing the end), or the stream
                    # outlived replay_ttl_s: never wait forever.
                    raise GoneError(f"stream {stream_id} ended without finishing: the replica running it stopped "
                                    "(or the stream expired)", code="stream_gone")
                if (await self.state(stream_id)).end_id is not None:  # ended before ``after``
                    return
                if quiet_until is not None and time.monotonic() >= quiet_until:
                    quiet_until = time.monotonic() + idle_s  # type: ignore[operator]
                    yield []
                continue
            batch: list[LogEntry] = []
            for entry_id, fields in reply[0][1]:
                last = entry_id.decode()
                name = fields[b"name"].decode()
                if name == END:
                    if batch:
                        yield batch
                    return
                batch.append((int(last.split("-")[0]), name, json.loads(fields[b"data"])))
            if quiet_until is not None:
                quiet_until = time.monotonic() + idle_s  # type: ignore[operator]
            yield batch

    async def touch(self, stream_id: str, ttl_s: float) -> None:
        if self.local.has(stream_id):
            await self.local.touch(stream_id, ttl_s)
        else:
            await self.r.set(self._key(stream_id, ":reader"), "1", px=max(1, int(ttl_s * 1000)))

    async def request_cancel(self, stream_id: str) -> None:
        if self.local.has(stream_id):  # produced here: the producer sees it at once
            await self.local.request_cancel(stream_id)
        else:
            await self.r.set(self._key(stream_id, ":cancel"), "1", ex=self.ttl_s)

    async def stop_reason(self, stream_id: str, wait_s: float) -> StopReason | None:
        # Asked by the producer, which runs here: a cancel made here wakes it at once, one made on another replica
        # is seen in Redis after the wait; a reader here is seen in memory, one elsewhere in Redis. One command a
        # round either way (it was two while the reader was elsewhere).
        if await self.local.cancel_requested(stream_id, wait_s):
            return "cancelled"
        cancel_key = self._key(stream_id, ":cancel")
        writer = self._writers.get(stream_id)
        if writer is not None and writer.lease_due():
            # The lease goes with the round's command (one round trip); a stream being written renews it anyway.
            async with self.r.pipeline(transaction=False) as pipe:
                self._claim(pipe, stream_id, writer.claim)
                pipe.mget(cancel_key, self._key(stream_id, ":reader"))
                _, (cancelled, reader) = await pipe.execute()
            writer.renewed()
        elif self.local.attached(stream_id):
            return "cancelled" if await self.r.exists(cancel_key) else None
        else:
            cancelled, reader = await self.r.mget(cancel_key, self._key(stream_id, ":reader"))
        if cancelled is not None:
            return "cancelled"
        return None if reader is not None or self.local.attached(stream_id) else "abandoned"


class _StreamWriter:
    """A stream's events on their way to Redis: at most one write in flight; what arrives meanwhile is written
    together next. Bounded: entries beyond ``max_events`` still waiting would be trimmed on arrival anyway.

    A write is started by a timer (``OFF_PATH_DELAY_S`` for the first, ``linger_s`` after each write for the
    rest), not by a task per event that waits out the linger: an event then costs its reader's path only a list
    append, where a task (and on Python 3.11 ``wait_for``'s own inner task) ran ahead of the reader's send."""

    def __init__(self, events: RedisEventLog, stream_id: str, owner_write: asyncio.Future[Any], claim: str) -> None:
        """``claim``: the owner key's value, written again with each renewal of the lease."""
        self.events, self.stream_id, self.owner_write, self.claim = events, stream_id, owner_write, claim
        self.renewed()
        self.pending: list[LogEntry] = []
        self.task: asyncio.Task[None] | None = None  # the write in flight
        self.timer: asyncio.TimerHandle | None = None  # the next write, scheduled
        self.written = False  # the first write goes at once; later ones linger
        self.hurry = False  # set by drain: no more lingering

    def renewed(self) -> None:
        self._lease_due = time.monotonic() + self.events.lease_ms / 3000

    def lease_due(self) -> bool:
        """Whether the producer's rounds must renew the lease (a third of it gone since the last renewal)."""
        return time.monotonic() >= self._lease_due

    def add(self, entry: LogEntry) -> None:
        self.pending.append(entry)
        del self.pending[:-self.events.max_events]
        if self.timer is None and (self.task is None or self.task.done()) and not self.hurry:
            self._schedule()

    def _schedule(self) -> None:
        # The first event goes to this replica's readers (the client's first token) before Redis.
        delay = self.events.linger_s if self.written else OFF_PATH_DELAY_S
        self.timer = asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        self.timer = None
        self.task = asyncio.create_task(self._flush(), name=f"chat-stream-write-{self.stream_id}")

    async def _flush(self) -> None:
        batch, self.pending = self.pending, []
        try:
            await self.owner_write
            await self.events._write(self.stream_id, batch, self.claim)
            self.renewed()
        except Exception as exc:  # the client already retried ~15 s: readers elsewhere miss these events
            log.warning("chat stream %s: %d event(s) not written to Redis: %s", self.stream_id, len(batch), exc)
        self.written = True
        if self.pending and self.timer is None and not self.hurry:  # what came during the write lingers
            self._schedule()

    async def drain(self) -> None:
        """Until everything added is written (or given up on); the write goes on if the caller is cancelled."""
        self.hurry = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.pending or (self.task is not None and not self.task.done()):
            if self.task is None or self.task.done():
                self._start()
            assert self.task is not None
            await asyncio.shield(self.task)


_CANCELLED = {"error": {"type": "cancelled", "code": "stream_cancelled", "param": None,
                        "message": "the stream was cancelled at the client's request"}}
_ABANDONED = {"error": {"type": "client_gone", "code": "stream_abandoned", "param": None,
                        "message": "no client read this stream; it was cancelled"}}
_STOPPING = server_stopping().to_response().model_dump()


class StreamHub:
    """Runs chat turns as producers into an EventLog and attaches readers to them."""

    def __init__(self, events: EventLog, grace_s: float, touch_every_s: float = 1.0,
                 active: Gauge | None = None, end_wait_s: float = 1.0) -> None:
        """``end_wait_s``: how long ``close`` lets the turns end themselves (they watch ``closing``) before it
        cuts them."""
        self.log, self.grace_s, self.touch_every_s, self.active = events, grace_s, touch_every_s, active
        self.end_wait_s = end_wait_s
        self._producers: dict[str, asyncio.Task[None]] = {}  # by stream id: the turns this replica runs
        self._closing = asyncio.Event()

    @property
    def closing(self) -> asyncio.Event:
        """Set once ``close`` begins: what else a replica runs for its clients (an answer in one piece) ends too."""
        return self._closing

    @property
    def _reader_ttl_s(self) -> float:
        # A reader refreshes every touch_every_s; the stream counts as read for grace_s after the last refresh.
        return self.grace_s + 2 * self.touch_every_s

    async def start(self, events: AsyncIterator[TurnEvent], owner: str | None) -> str:
        if self._closing.is_set():  # a request that got in as the server began to stop
            raise server_stopping("the server is stopping; send it again")
        stream_id = uuid.uuid4().hex
        await self.log.create(stream_id, owner, self._reader_ttl_s)
        task = asyncio.create_task(self._produce(stream_id, events), name=f"chat-stream-{stream_id}")
        self._producers[stream_id] = task
        task.add_done_callback(lambda _: self._producers.pop(stream_id, None))
        try:
            await self.log.published(stream_id)  # the turn is already under way meanwhile
        except BaseException:
            task.cancel()  # nobody will learn of this stream: its turn (and generation) ends here
            raise
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
            except STORE_DOWN as exc:  # the turn's conversation could not be saved, say: as a 503 before it would be
                await emit("error", store_unavailable(exc).to_response().model_dump())
            except Exception:
                log.exception("chat stream %s failed", stream_id)
                await emit("error", {"error": {"type": "internal_error", "code": "internal_error",
                                               "message": "the request failed", "param": None}})
            finally:
                await events.aclose()  # type: ignore[attr-defined]

        async def watch() -> StopReason:
            """Why the turn must stop: a client asked to cancel it, or no client reads it any more."""
            while True:
                reason = await self.log.stop_reason(stream_id, self.touch_every_s)
                if reason is not None:
                    return reason

        pumping = asyncio.create_task(pump())
        watching = asyncio.create_task(watch())
        if self.active is not None:
            self.active.inc()
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not pumping.done():
                # Cancelled, or nobody read the stream for grace_s (the client is gone). Closing the turn cancels
                # the generation and its decode jobs; a turn cut before its text ended is not kept in the
                # conversation.
                reason = watching.result() if watching.exception() is None else "abandoned"
                if reason == "cancelled":
                    log.info("chat stream %s cancelled at the client's request", stream_id)
                else:
                    log.info("chat stream %s has no reader for %.1f s: cancelling it", stream_id, self.grace_s)
                pumping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pumping
                await emit("error", _CANCELLED if reason == "cancelled" else _ABANDONED)
        except Exception:
            log.exception("chat stream %s: producer failed", stream_id)
        finally:
            watching.cancel()
            cut = not pumping.done()
            if cut:
                # The producer itself was stopped (its stream could not be published, or the server is closing):
                # the turn ends with it, or it would generate on for nobody and write to a stream already ended.
                pumping.cancel()
                await asyncio.wait({pumping})
            if self.active is not None:
                self.active.dec()
            with contextlib.suppress(Exception):
                if cut:  # its readers (on other replicas: a graceful stop waits for this one's) learn why it ends
                    await emit("error", _STOPPING)
                await self.log.append(stream_id, next_id + 1, END, {})

    async def _own(self, stream_id: str, owner: str | None) -> StreamState:
        state = await self.log.state(stream_id)
        if not state.exists or state.owner != owner:
            raise NotFoundError(f"stream {stream_id} not found (or expired)", code="stream_not_found")
        return state

    async def cancel(self, stream_id: str, owner: str | None) -> bool:
        """Stops the stream's turn (generation and decode jobs), on whichever replica runs it; False when it
        had already ended."""
        if (await self._own(stream_id, owner)).end_id is not None:
            return False
        await self.log.request_cancel(stream_id)
        return True

    async def attach(self, stream_id: str, owner: str | None, after: int = 0,
                     idle_s: float | None = None) -> AsyncIterator[list[LogEntry]]:
        """The stream's entries after ``after``, in batches (``EventLog.read``; ``idle_s``: an empty batch after
        that long with nothing new)."""
        state = await self._own(stream_id, owner)
        end, first = state.end_id, state.first_id
        if end is not None and after >= end:
            raise InvalidRequestError(f"stream {stream_id} ended at event {end - 1}; there is no event {after}",
                                      code="invalid_event_id", param="Last-Event-ID")
        if first is not None and first > after + 1:
            raise GoneError(f"events {after + 1}..{first - 1} of stream {stream_id} are past the replay window",
                            code="replay_window_passed")
        # Touch now, not at the first event: the producer must see this reader even before anything arrives.
        await self.log.touch(stream_id, self._reader_ttl_s)
        return self._follow(stream_id, self.log.read(stream_id, after, idle_s))

    @contextlib.asynccontextmanager
    async def reading(self, stream_id: str) -> AsyncIterator[None]:
        """The stream counts as read while inside: a reader's loop, and a streamed answer whose start (its status,
        then its headers) waits for the turn's first event, its client connected all the while. (``attach`` has
        just touched it: the first touch here waits a round, off the path to the first token.)"""
        async def keep_touching() -> None:
            while True:
                await asyncio.sleep(self.touch_every_s)
                with contextlib.suppress(Exception):
                    await self.log.touch(stream_id, self._reader_ttl_s)

        toucher = asyncio.create_task(keep_touching())
        try:
            yield
        finally:
            toucher.cancel()

    async def _follow(self, stream_id: str, reader: AsyncIterator[list[LogEntry]]) -> AsyncIterator[list[LogEntry]]:
        # A stream produced here is read to its end, which close() brings (server_stopping). One produced on
        # another replica (or already over) ends its response when this replica closes: without done, so that its
        # client resumes it elsewhere with Last-Event-ID rather than holding this replica's shutdown.
        watch = None if stream_id in self._producers else StopWatch(self._closing)
        try:
            async with self.reading(stream_id):
                while True:
                    try:
                        batch = await (anext(reader, None) if watch is None else watch.next(reader))
                    except Stopped:
                        return
                    if batch is None:
                        return
                    yield batch
        finally:
            if watch is not None:
                watch.close()
            await reader.aclose()  # type: ignore[attr-defined]

    async def close(self, reason: str = "closing") -> None:
        """Ends every turn this replica runs and the responses that follow streams produced elsewhere; refuses
        new turns from now on. A turn watching ``closing`` ends itself (``server_stopping``, or ``done`` with its
        media pending once its text is kept: ``ChatService.run``); one still running after ``end_wait_s`` is cut
        (its readers get ``error`` ``server_stopping``, then the end)."""
        self._closing.set()
        tasks = list(self._producers.values())
        if tasks:
            log.warning("%s: ending %d chat turn(s) still under way", reason, len(tasks))
            _, running = await asyncio.wait(tasks, timeout=self.end_wait_s)
            for task in running:
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

