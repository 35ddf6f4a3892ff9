"""The Redis clients every service uses, against a real ``redis-server`` that stops answering (SIGSTOP: its port
still takes connections and bytes, as a hung process or a network dropping packets does)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from services.jobs.redis_clients import SOCKET_TIMEOUT_S, async_redis, sync_redis
from tests.support.servers import RestartableRedis


@pytest.fixture
def server() -> Iterator[RestartableRedis]:
    running = RestartableRedis().start()
    try:
        yield running
    finally:
        if running.proc is not None:
            os.kill(running.proc.pid, signal.SIGCONT)
        running.close()


async def test_a_redis_that_stops_answering_fails_each_command_in_its_socket_timeout(server: RestartableRedis) -> None:
    # Before: timeouts were retried like a restart's refused connections, eleven times with backoff (77 s through
    # the gateway), and a redis-py before 8 had no socket timeout at all.
    sync, async_ = sync_redis(server.url), async_redis(server.url)
    sync.set("k", "1")
    await async_.set("k", "1")
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)

    async def timed(call: object) -> tuple[str, float]:
        started = time.monotonic()
        try:
            await call  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - which one is the point
            return type(exc).__name__, time.monotonic() - started
        return "answered", time.monotonic() - started

    outcomes = await asyncio.gather(timed(async_.get("k")), timed(asyncio.to_thread(sync.get, "k")))
    for name, took in outcomes:
        assert name == "TimeoutError" and took < SOCKET_TIMEOUT_S + 3, outcomes
    os.kill(server.proc.pid, signal.SIGCONT)
    assert await async_.get("k") == b"1" and sync.get("k") == b"1"  # the same clients go on once it answers
    await async_.aclose()
    sync.close()
