"""Where a worker writes a job's status and events, and reads its cancel flag.

``RedisJobBook``: the status as JSON under a key, events in a Redis stream (replayable, bounded), both with a
TTL. ``MemoryJobBook``: the same in one process, for embedded mode.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, Literal

from services.contracts.decoders import TERMINAL_STATES, DecodeJob, JobEvent, JobState, JobStatus
from services.contracts.job_keys import (
    JOB_TTL_S, MAX_EVENTS, cancel_key, events_key, job_key, lock_key, lost_key, status_key,
)

_STATE_OF_EVENT: dict[str, JobState] = {
    "queued": "queued", "started": "running", "progress": "running", "completed": "completed",
    "failed": "failed", "cancelled": "cancelled",
}


def next_status(current: JobStatus | None, event: JobEvent, modality: Any = None) -> JobStatus:
    status = current or JobStatus(job_id=event.job_id, state="queued", modality=modality)
    update: dict[str, Any] = {"state": _STATE_OF_EVENT[event.type], "updated_at": event.at}
    if event.step is not None:
        update["step"], update["total"] = event.step, event.total or status.total
    if event.artifact is not None:
        update["artifact"] = event.artifact
    if event.error is not None:
        update["error"] = event.error
    if modality is not None:
        update["modality"] = modality
    if event.owner is not None:
        update["owner"] = event.owner
    return status.model_copy(update=update)


class JobBook(ABC):
    @abstractmethod
    def publish(self, event: JobEvent, modality: Any = None, only_if: JobState | None = None) -> bool:
        """Record ``event``; with ``only_if``, only when the job is in that state now (atomically). True when
        recorded (a late event for a finished job is not)."""

    @abstractmethod
    def status(self, job_id: str) -> JobStatus | None: ...

    @abstractmethod
    def is_cancelled(self, job_id: str) -> bool: ...

    @abstractmethod
    def cancel(self, job_id: str) -> None: ...

    @abstractmethod
    def claim(self, job_id: str, ttl_s: int) -> str | None:
        """A lease token when this worker may run the job now (no other delivery holds it), else None."""

    @abstractmethod
    def renew(self, job_id: str, token: str, ttl_s: int) -> bool:
        """Extend the lease if ``token`` still holds it (False: it was lost). A claim is a lease, so a worker that
        dies frees its job when the lease runs out."""

    @abstractmethod
    def release(self, job_id: str, token: str) -> None:
        """Drop the lease, only if ``token`` still holds it: a worker never frees another worker's lease."""


class JobBookUnavailable(Exception):
    """The book's store could not be reached (after the client's own retries): a transient failure."""


@contextlib.contextmanager
def _reachable() -> Iterator[None]:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise JobBookUnavailable(f"redis: {exc}") from exc


def _applies(current: JobStatus | None, event: JobEvent, only_if: JobState | None) -> bool:
    if only_if is not None and (current is None or current.state != only_if):
        return False
    # A late progress event must not reopen a finished job (a completed artifact still wins over a cancel).
    return current is None or current.state not in TERMINAL_STATES or event.type == "completed"


def fail_unclaimed(book: JobBook, job_id: str, modality: Any, waited_s: float, code: str) -> bool:
    """Fail a job that is still queued (no worker took it): atomically, only if still queued; then flag it
    cancelled so that a worker taking it late skips it. True when it was failed here."""
    what = f"{modality} decoder worker" if modality else "decoder worker"
    event = JobEvent(job_id=job_id, type="failed",
                     error=f"{code}: no {what} took this job within {waited_s:.0f} s")
    if not book.publish(event, modality, only_if="queued"):
        return False
    book.cancel(job_id)
    return True


class RedisJobBook(JobBook):
    def __init__(self, client: Any, prefix: str, ttl_s: int = JOB_TTL_S) -> None:
        self.r, self.prefix, self.ttl = client, prefix, ttl_s

    def publish(self, event: JobEvent, modality: Any = None, only_if: JobState | None = None) -> bool:
        """Read the status, apply the event, write both, as one optimistic transaction (WATCH): a publisher
        racing another (the gateway's cancel, a second delivery) never writes over a transition it did not see."""
        from redis.exceptions import WatchError

        skey, ekey = status_key(self.prefix, event.job_id), events_key(self.prefix, event.job_id)
        with _reachable(), self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(skey)
                    raw = pipe.get(skey)
                    current = JobStatus.model_validate_json(raw) if raw else None
                    if not _applies(current, event, only_if):
                        pipe.unwatch()
                        return False
                    status = next_status(current, event, modality)
                    pipe.multi()
                    pipe.set(skey, status.model_dump_json(), ex=self.ttl)
                    pipe.xadd(ekey, {"event": event.model_dump_json()}, maxlen=MAX_EVENTS, approximate=True)
                    pipe.expire(ekey, self.ttl)
                    pipe.execute()
                    return True
                except WatchError:
                    continue

    def status(self, job_id: str) -> JobStatus | None:
        with _reachable():
            raw = self.r.get(status_key(self.prefix, job_id))
            return JobStatus.model_validate_json(raw) if raw else None

    def is_cancelled(self, job_id: str) -> bool:
        with _reachable():
            return bool(self.r.exists(cancel_key(self.prefix, job_id)))

    def cancel(self, job_id: str) -> None:
        with _reachable():
            self.r.set(cancel_key(self.prefix, job_id), "1", ex=self.ttl)

    def claim(self, job_id: str, ttl_s: int) -> str | None:
        token = uuid.uuid4().hex
        with _reachable():
            return token if self.r.set(lock_key(self.prefix, job_id), token, nx=True, ex=ttl_s) else None

    def renew(self, job_id: str, token: str, ttl_s: int) -> bool:
        with _reachable():
            return bool(self.r.eval(_RENEW_IF_OWNED, 1, lock_key(self.prefix, job_id), token, ttl_s))

    def release(self, job_id: str, token: str) -> None:
        with _reachable():
            self.r.eval(_DELETE_IF_OWNED, 1, lock_key(self.prefix, job_id), token)

    def keep(self, job: DecodeJob) -> None:
        """Keep the job as submitted (a few hundred bytes) for as long as its status: see ``requeue_if_lost``."""
        with _reachable():
            self.r.set(job_key(self.prefix, job.job_id), job.model_dump_json(), ex=self.ttl)

    def requeue_if_lost(self, job_id: str, lost_after_s: float,
                        max_lost: int = 2) -> tuple[Literal["requeued", "failed"], DecodeJob] | None:
        """The job, put back to ``queued``, when the worker running it is gone: it is running, nobody holds its
        lease (a live worker renews it every third of its TTL, whatever a step takes) and it has reported nothing
        for ``lost_after_s``; atomically (WATCH on its status and lease), so of several callers one requeues it.
        Celery would hand out such a job again only after its visibility timeout (an hour by default): the caller
        sends it again now. A job that lost its worker ``max_lost`` times already may be what kills them (memory):
        it fails (``worker_lost``) instead, flagged cancelled so that no delivery of it runs again, rather than
        take down every worker in turn. What was done with it, and the job; None when it is not lost (or was never
        kept)."""
        from redis.exceptions import WatchError

        skey, lkey = status_key(self.prefix, job_id), lock_key(self.prefix, job_id)
        count = lost_key(self.prefix, job_id)
        with _reachable(), self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(skey, lkey)
                    raw, leased, kept = pipe.get(skey), pipe.exists(lkey), pipe.get(job_key(self.prefix, job_id))
                    current = JobStatus.model_validate_json(raw) if raw else None
                    if current is None or current.state != "running" or leased or kept is None or \
                            (datetime.now(timezone.utc) - current.updated_at).total_seconds() < lost_after_s:
                        pipe.unwatch()
                        return None
                    lost = int(pipe.get(count) or 0)
                    event = JobEvent(job_id=job_id, type="queued", step=0) if lost < max_lost else JobEvent(
                        job_id=job_id, type="failed",
                        error=f"worker_lost: the worker running this job died {lost + 1} times (the job may be what "
                              "kills it: too large for its memory?)")
                    pipe.multi()
                    pipe.set(skey, next_status(current, event).model_dump_json(), ex=self.ttl)
                    pipe.xadd(events_key(self.prefix, job_id), {"event": event.model_dump_json()}, maxlen=MAX_EVENTS,
                              approximate=True)
                    pipe.set(count, lost + 1, ex=self.ttl)
                    if event.type == "failed":
                        pipe.set(cancel_key(self.prefix, job_id), "1", ex=self.ttl)
                    pipe.execute()
                    return "requeued" if event.type == "queued" else "failed", DecodeJob.model_validate_json(kept)
                except WatchError:
                    continue


# Compare-and-act on the lease, atomically in Redis: only the holder of the token may extend or drop it.
_RENEW_IF_OWNED = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end
return 0
"""
_DELETE_IF_OWNED = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class MemoryJobBook(JobBook):
    """In-process book; ``listeners`` are called (from the worker thread) with every event."""

    def __init__(self, max_jobs: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, JobStatus] = {}
        self._events: dict[str, list[JobEvent]] = {}
        self._published: dict[str, int] = {}  # events ever published per job (the list keeps the last MAX_EVENTS)
        self._cancelled: set[str] = set()
        self._running: dict[str, str] = {}  # job id -> lease token
        self.max_jobs = max_jobs
        self.listeners: list[Any] = []

    def publish(self, event: JobEvent, modality: Any = None, only_if: JobState | None = None) -> bool:
        with self._lock:
            current = self._status.get(event.job_id)
            if not _applies(current, event, only_if):
                return False
            self._status[event.job_id] = next_status(current, event, modality)
            events = self._events.setdefault(event.job_id, [])
            events.append(event)
            del events[:-MAX_EVENTS]
            self._published[event.job_id] = self._published.get(event.job_id, 0) + 1
            self._evict()
        for listener in list(self.listeners):
            listener(event)
        return True

    def _evict(self) -> None:
        # Bounded memory: forget the oldest finished jobs first.
        while len(self._status) > self.max_jobs:
            finished = [j for j, s in self._status.items() if s.state in TERMINAL_STATES]
            victim = finished[0] if finished else next(iter(self._status))
            self._status.pop(victim, None)
            self._events.pop(victim, None)
            self._published.pop(victim, None)
            self._cancelled.discard(victim)

    def events(self, job_id: str) -> list[JobEvent]:
        with self._lock:
            return list(self._events.get(job_id, []))

    def events_after(self, job_id: str, seen: int) -> tuple[list[JobEvent], int]:
        """The job's events past the first ``seen`` ever published, and how many have been published: a reader's
        place stays right when the list has dropped its oldest (a job retried many times over many steps), where an
        index into the list would point past its end for good."""
        with self._lock:
            events = self._events.get(job_id, [])
            published = self._published.get(job_id, 0)
            return events[max(0, seen - (published - len(events))):], published

    def status(self, job_id: str) -> JobStatus | None:
        with self._lock:
            return self._status.get(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)

    def claim(self, job_id: str, ttl_s: int) -> str | None:
        with self._lock:
            if job_id in self._running:
                return None
            token = uuid.uuid4().hex
            self._running[job_id] = token
            return token

    def renew(self, job_id: str, token: str, ttl_s: int) -> bool:
        # In one process a dead worker takes its claims with it: no expiry, only ownership.
        with self._lock:
            return self._running.get(job_id) == token

    def release(self, job_id: str, token: str) -> None:
        with self._lock:
            if self._running.get(job_id) == token:
                del self._running[job_id]
