"""The in-memory stream log's retention: ended streams go after ``ttl_s`` or when over ``max_streams`` (oldest end
first); a running stream is never dropped. Each sweep looks only at the oldest ended streams, so a busy replica's
thousands of recently ended ones do not make starting a stream cost a scan of them all (measured in the gateway
bench, not here)."""

from __future__ import annotations

import time

import pytest

from gateway.streams import END, MemoryEventLog


async def _ended(log: MemoryEventLog, stream_id: str) -> None:
    await log.create(stream_id, None, 1.0)
    await log.append(stream_id, 1, "message.delta", {"text": "x"})
    await log.append(stream_id, 2, END, {})


async def test_over_max_streams_the_oldest_ended_go_first_and_running_ones_stay() -> None:
    log = MemoryEventLog(max_events=10, ttl_s=60, max_streams=3)
    await log.create("running", None, 1.0)
    for name in ("a", "b", "c"):
        await _ended(log, name)
    await log.create("d", None, 1.0)  # the oldest ended stream makes room (the bound holds before each start)
    assert [s for s in ("running", "a", "b", "c", "d") if log.has(s)] == ["running", "b", "c", "d"]
    await log.create("e", None, 1.0)
    assert [s for s in ("running", "a", "b", "c", "d", "e") if log.has(s)] == ["running", "c", "d", "e"]
    assert (await log.state("running")).exists


async def test_ended_streams_expire_after_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    log = MemoryEventLog(max_events=10, ttl_s=5, max_streams=100)
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    await _ended(log, "old")
    now[0] += 3
    await _ended(log, "young")
    await log.create("running", None, 1.0)
    now[0] += 3  # "old" ended 6 s ago, "young" 3 s ago
    assert not (await log.state("old")).exists
    assert (await log.state("young")).exists and (await log.state("running")).exists
    now[0] += 100
    assert not (await log.state("young")).exists and (await log.state("running")).exists



async def test_over_max_bytes_the_oldest_ended_go_first_and_running_ones_stay() -> None:
    """Streams with media inline hold their base64: a byte budget, not only a count, bounds the ended ones kept."""
    log = MemoryEventLog(max_events=10, ttl_s=60, max_streams=100, max_bytes=2_500_000)
    await log.create("running", None, 1.0)
    await log.append("running", 1, "artifact.completed", {"artifact": {"data": "x" * 1_000_000}})
    for name in ("a", "b"):
        await log.create(name, None, 1.0)
        await log.append(name, 1, "artifact.completed", {"artifact": {"job_id": name, "data": "x" * 600_000}})
        await log.append(name, 2, END, {})
    assert [s for s in ("running", "a", "b") if log.has(s)] == ["running", "a", "b"]
    await log.create("c", None, 1.0)
    await log.append("c", 1, "artifact.completed", {"artifact": {"data": "x" * 600_000}})
    await log.append("c", 2, END, {})  # 2.8 MB: the oldest ended stream goes
    assert [s for s in ("running", "a", "b", "c") if log.has(s)] == ["running", "b", "c"]
    assert 2_200_000 < log.bytes <= 2_500_000
    for name in ("d", "e", "f"):  # small ones ended later do not push out more than needed
        await _ended(log, name)
    assert [s for s in ("running", "b", "c", "d", "e", "f") if log.has(s)] == ["running", "b", "c", "d", "e", "f"]
