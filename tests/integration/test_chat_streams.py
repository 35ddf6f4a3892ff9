"""Resumable chat streams and conversation history, on both backends: in memory and on a real Redis."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import numpy as np
import pytest
import redis.asyncio

from gateway.chat import ChatService
from gateway.conversations import (
    Conversation,
    ConversationStore,
    MemoryConversationStore,
    RedisConversationStore,
    StoredTurn,
)
from gateway.streams import EventLog, MemoryEventLog, RedisEventLog, StopReason, StreamHub, StreamState
from gateway.turn_events import ArtifactCompleted, MessageDelta, TextComplete, TurnDone, TurnEvent
from services.contracts.chat import ArtifactOut, ChatRequest
from services.contracts.decoders import DecoderQueue
from services.contracts.encoder import EncoderClient
from services.contracts.llm import Done, GenerateParams, LLMClient, LLMEvent, TextDelta
from services.contracts.storage import ArtifactStore
from services.contracts.errors import GoneError, InvalidRequestError, NotFoundError, ServiceUnavailableError
from services.jobs.redis_clients import async_redis
from tests.support.servers import RedisInfo, redis_transactions

Factory = Callable[[int], EventLog]


class _Replicas(EventLog):
    """Two gateway replicas on one Redis: the turn runs on the first, its readers attach to the second."""

    def __init__(self, producer: RedisEventLog, reader: RedisEventLog) -> None:
        self.producer, self.reader = producer, reader

    async def create(self, stream_id: str, owner: str | None, reader_ttl_s: float) -> None:
        await self.producer.create(stream_id, owner, reader_ttl_s)

    async def published(self, stream_id: str) -> None:
        await self.producer.published(stream_id)

    async def state(self, stream_id: str) -> StreamState:
        return await self.reader.state(stream_id)

    async def append(self, stream_id: str, event_id: int, name: str, data: dict[str, Any]) -> None:
        await self.producer.append(stream_id, event_id, name, data)

    def read(self, stream_id: str, after: int, idle_s: float | None = None
             ) -> AsyncIterator[list[tuple[int, str, dict[str, Any]]]]:
        return self.reader.read(stream_id, after, idle_s)

    async def touch(self, stream_id: str, ttl_s: float) -> None:
        await self.reader.touch(stream_id, ttl_s)

    async def request_cancel(self, stream_id: str) -> None:
        await self.reader.request_cancel(stream_id)

    async def stop_reason(self, stream_id: str, wait_s: float) -> StopReason | None:
        return await self.producer.stop_reason(stream_id, wait_s)


@pytest.fixture(params=["memory", "redis", "redis, another replica"])
async def make_log(request: pytest.FixtureRequest, redis_info: RedisInfo) -> AsyncIterator[Factory]:
    if request.param == "memory":
        yield lambda max_events: MemoryEventLog(max_events, ttl_s=60)
        return
    client = async_redis(redis_info.url)  # the client the gateway uses: it rides out Redis restarts
    prefix = f"{redis_info.key_prefix}streams-{uuid.uuid4().hex[:6]}:"
    if request.param == "redis":
        yield lambda max_events: RedisEventLog(client, prefix, max_events, ttl_s=60, block_ms=200)
    else:
        yield lambda max_events: _Replicas(RedisEventLog(client, prefix, max_events, ttl_s=60, block_ms=200),
                                           RedisEventLog(client, prefix, max_events, ttl_s=60, block_ms=200))
    async for key in client.scan_iter(f"{prefix}*"):
        await client.delete(key)
    await client.aclose()


class Turn:
    """A fake chat turn: emits ``count`` deltas, one every ``every_s``, then done; records being closed."""

    def __init__(self, count: int, every_s: float = 0.0, fail_at: int | None = None) -> None:
        self.count, self.every_s, self.fail_at = count, every_s, fail_at
        self.closed = asyncio.Event()
        self.emitted = 0

    async def events(self) -> AsyncIterator[TurnEvent]:
        try:
            yield TextComplete("stop", 1, 1)  # internal: never reaches the log
            for i in range(self.count):
                if self.fail_at == i:
                    raise ServiceUnavailableError("llm went away", code="llm_unavailable")
                await asyncio.sleep(self.every_s)
                self.emitted += 1
                yield MessageDelta(f"t{i}")
            yield TurnDone(conversation_id="c", finish_reason="stop", text="", usage={})
        finally:
            self.closed.set()


async def _flat(batches: AsyncIterator[list[tuple[int, str, dict[str, Any]]]]
                ) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
    """A reader's batches as single entries (closing it closes the reader)."""
    try:
        async for batch in batches:
            for entry in batch:
                yield entry
    finally:
        await batches.aclose()  # type: ignore[attr-defined]


async def _drain(batches: AsyncIterator[list[tuple[int, str, dict[str, Any]]]], limit: int | None = None
                 ) -> list[Any]:
    out = []
    entries = _flat(batches)
    async for entry in entries:
        out.append(entry)
        if limit is not None and len(out) == limit:
            await entries.aclose()  # type: ignore[attr-defined]
            break
    return out


async def test_reader_gets_every_event_with_consecutive_ids(make_log: Factory) -> None:
    hub = StreamHub(make_log(1000), grace_s=5, touch_every_s=0.1)
    turn = Turn(20)
    stream_id = await hub.start(turn.events(), owner="alice")
    entries = await asyncio.wait_for(_drain(await hub.attach(stream_id, "alice")), 20)
    assert [e[0] for e in entries] == list(range(1, 22))
    assert [e[2].get("text") for e in entries[:-1]] == [f"t{i}" for i in range(20)] and entries[-1][1] == "done"
    await hub.close()


async def test_reconnect_with_last_event_id_gets_the_rest_then_live(make_log: Factory) -> None:
    hub = StreamHub(make_log(1000), grace_s=5, touch_every_s=0.1)
    turn = Turn(30, every_s=0.02)
    stream_id = await hub.start(turn.events(), owner=None)
    first = await _drain(await hub.attach(stream_id, None), limit=7)  # the client drops after 7 events
    rest = await asyncio.wait_for(_drain(await hub.attach(stream_id, None, after=first[-1][0])), 20)
    ids = [e[0] for e in first + rest]
    assert ids == list(range(1, 32)) and rest[-1][1] == "done"
    # A finished stream is still replayable from any point in the window.
    again = await _drain(await hub.attach(stream_id, None, after=28))
    assert [e[0] for e in again] == [29, 30, 31]
    assert turn.emitted == 30 and not any(e[1] == "error" for e in rest)
    await hub.close()


async def test_nobody_reading_for_the_grace_period_cancels_the_turn(make_log: Factory) -> None:
    hub = StreamHub(make_log(1000), grace_s=0.5, touch_every_s=0.1)
    turn = Turn(1000, every_s=0.01)
    stream_id = await hub.start(turn.events(), owner=None)
    await _drain(await hub.attach(stream_id, None), limit=3)
    await asyncio.wait_for(turn.closed.wait(), 10)  # the generation was closed, not finished
    assert turn.emitted < 1000
    tail = await asyncio.wait_for(_drain(await hub.attach(stream_id, None, after=turn.emitted)), 10)
    assert tail[-1][1] == "error" and tail[-1][2]["error"]["code"] == "stream_abandoned"
    await hub.close()


async def test_a_reader_slow_to_take_each_event_still_gets_every_one_to_the_end(make_log: Factory) -> None:
    """A reader holding an event (its client slow to take a big one) while the turn ends: the events after it,
    done included, still come (the memory log's reader used to stop at the end of what it had seen, dropping
    them: a client then saw its stream end without done)."""
    hub = StreamHub(make_log(1000), grace_s=5, touch_every_s=0.1)
    turn = Turn(5)
    stream_id = await hub.start(turn.events(), owner=None)
    entries = await hub.attach(stream_id, None)
    first = await anext(entries)  # a batch, held
    await asyncio.wait_for(turn.closed.wait(), 5)
    await asyncio.sleep(0.3)  # the end is logged meanwhile
    rest = await asyncio.wait_for(_drain(entries), 10)
    got = [*first, *rest]
    assert [e[0] for e in got] == list(range(1, 7)) and got[-1][1] == "done"
    await hub.close()


async def test_a_cancel_stops_the_turn_at_once_on_whichever_replica_runs_it(make_log: Factory) -> None:
    hub = StreamHub(make_log(1000), grace_s=30, touch_every_s=0.2)
    turn = Turn(1000, every_s=0.01)
    stream_id = await hub.start(turn.events(), owner="alice")
    entries = await hub.attach(stream_id, "alice")
    first = [entry for _ in range(3) for entry in await anext(entries)]
    with pytest.raises(NotFoundError):
        await hub.cancel(stream_id, "bob")  # another key's stream is not there for it
    assert not turn.closed.is_set() and await hub.cancel(stream_id, "alice")
    await asyncio.wait_for(turn.closed.wait(), 2)  # well before the 30 s grace: the reader is still attached
    rest = await asyncio.wait_for(_drain(entries), 10)
    assert turn.emitted < 1000 and [e[0] for e in first + rest] == list(range(1, len(first + rest) + 1))
    assert rest[-1][1] == "error" and rest[-1][2]["error"]["code"] == "stream_cancelled"
    assert not await hub.cancel(stream_id, "alice")  # already ended: nothing to do
    await hub.close()


async def test_a_reconnect_within_the_grace_period_keeps_the_turn_alive(make_log: Factory) -> None:
    hub = StreamHub(make_log(1000), grace_s=1.0, touch_every_s=0.1)
    turn = Turn(150, every_s=0.02)  # ~3 s: longer than the grace period
    stream_id = await hub.start(turn.events(), owner=None)
    first = await _drain(await hub.attach(stream_id, None), limit=2)
    await asyncio.sleep(0.5)
    rest = await asyncio.wait_for(_drain(await hub.attach(stream_id, None, after=first[-1][0])), 20)
    assert rest[-1][1] == "done" and turn.emitted == 150
    await hub.close()


async def test_a_turn_cut_by_the_server_closing_tells_its_readers_why(make_log: Factory) -> None:
    """A server that stops waits for the streams it serves; a turn whose readers are elsewhere (on another
    replica) is cut when it closes. Those readers get an ``error`` (``server_stopping``: send it again) before the
    end, where the stream just ended, with neither ``done`` nor ``error``, as if the reply were complete."""
    hub = StreamHub(make_log(1000), grace_s=30, touch_every_s=0.1)
    turn = Turn(1000, every_s=0.01)
    stream_id = await hub.start(turn.events(), owner=None)
    entries = await hub.attach(stream_id, None)
    first = [entry for _ in range(2) for entry in await anext(entries)]
    await hub.close()
    assert turn.closed.is_set() and turn.emitted < 1000
    rest = await asyncio.wait_for(_drain(entries), 10)
    got = first + rest
    assert [e[0] for e in got] == list(range(1, len(got) + 1))
    assert got[-1][1] == "error" and got[-1][2]["error"]["code"] == "server_stopping"


async def test_a_closing_replica_lets_go_of_the_streams_it_only_reads_and_takes_no_new_turn(
        redis_info: RedisInfo) -> None:
    """A replica at the end of its stop grace: the responses it serves for turns that run elsewhere end at once
    (without ``done``: their clients resume on another replica), where they held its stop until the orchestrator
    killed it; the turn itself goes on where it runs, and a turn asked of the closing replica is a 503."""
    client = async_redis(redis_info.url)
    prefix = f"{redis_info.key_prefix}streams-{uuid.uuid4().hex[:6]}:"
    producer = StreamHub(RedisEventLog(client, prefix, 1000, ttl_s=60, block_ms=5000), grace_s=30, touch_every_s=0.1)
    closing = StreamHub(RedisEventLog(client, prefix, 1000, ttl_s=60, block_ms=5000), grace_s=30, touch_every_s=0.1)
    try:
        turn = Turn(150, every_s=0.02)
        stream_id = await producer.start(turn.events(), owner=None)
        entries = _flat(await closing.attach(stream_id, None))
        first = await anext(entries)
        started = time.monotonic()
        await closing.close()
        rest = await asyncio.wait_for(_drain_flat(entries), 3)
        assert time.monotonic() - started < 1.0  # not the reader's 5 s block, nor the turn's 3 s
        assert all(name == "message.delta" for _, name, _ in [first, *rest])  # no done, no error: resume elsewhere
        assert not turn.closed.is_set()
        with pytest.raises(ServiceUnavailableError) as refused:
            await closing.start(Turn(1).events(), owner=None)
        assert refused.value.code == "server_stopping"
        resumed = await asyncio.wait_for(_drain(await producer.attach(stream_id, None, after=first[0] + len(rest))), 20)
        assert resumed[-1][1] == "done" and turn.emitted == 150
    finally:
        await producer.close()
        async for key in client.scan_iter(f"{prefix}*"):
            await client.delete(key)
        await client.aclose()


async def _drain_flat(entries: AsyncIterator[tuple[int, str, dict[str, Any]]]) -> list[Any]:
    return [entry async for entry in entries]


async def test_errors_end_the_stream_in_the_shared_shape(make_log: Factory) -> None:
    hub = StreamHub(make_log(1000), grace_s=5, touch_every_s=0.1)
    stream_id = await hub.start(Turn(10, fail_at=4).events(), owner=None)
    entries = await asyncio.wait_for(_drain(await hub.attach(stream_id, None)), 20)
    assert [e[1] for e in entries] == ["message.delta"] * 4 + ["error"]
    assert entries[-1][2]["error"]["code"] == "llm_unavailable"
    await hub.close()


async def test_the_store_out_of_reach_mid_turn_ends_the_stream_as_a_503_would(
        make_log: Factory, caplog: pytest.LogCaptureFixture) -> None:
    """Redis out of reach while a turn runs (its conversation being saved, say) is ``redis_unavailable``, retry
    later, as the same failure before the response started is a 503: it was an ``internal_error`` ("the request
    failed") with a traceback in the log."""
    async def turn() -> AsyncIterator[TurnEvent]:
        yield MessageDelta("a")
        raise redis.exceptions.ConnectionError("Error 111 connecting to 10.0.0.7:6379. Connection refused.")

    hub = StreamHub(make_log(1000), grace_s=5, touch_every_s=0.1)
    stream_id = await hub.start(turn(), owner=None)
    entries = await asyncio.wait_for(_drain(await hub.attach(stream_id, None)), 20)
    assert [e[1] for e in entries] == ["message.delta", "error"]
    error = entries[-1][2]["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "redis_unavailable")
    assert "10.0.0.7" not in error["message"]  # the store's address stays in the log
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    await hub.close()


async def test_other_owners_and_old_events_are_refused(make_log: Factory) -> None:
    hub = StreamHub(make_log(10), grace_s=5, touch_every_s=0.1)
    stream_id = await hub.start(Turn(25).events(), owner="alice")
    await asyncio.wait_for(_drain(await hub.attach(stream_id, "alice", after=25)), 20)
    with pytest.raises(NotFoundError):
        await hub.attach(stream_id, "mallory")
    with pytest.raises(NotFoundError):
        await hub.attach(uuid.uuid4().hex, "alice")
    with pytest.raises(GoneError, match="replay window"):
        await hub.attach(stream_id, "alice", after=3)  # only the last 10 events are kept
    # 26 events + the end marker, the last 10 kept: 18..27.
    kept = await _drain(await hub.attach(stream_id, "alice", after=17))
    assert [e[0] for e in kept] == list(range(18, 27))
    await hub.close()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_info: RedisInfo) -> AsyncIterator[ConversationStore]:
    if request.param == "memory":
        yield MemoryConversationStore(max_conversations=10, max_turns=4, ttl_s=60)
        return
    client = redis.asyncio.Redis.from_url(redis_info.url)
    prefix = f"{redis_info.key_prefix}conv-{uuid.uuid4().hex[:6]}:"
    yield RedisConversationStore(client, prefix, ttl_s=60, max_turns=4)
    async for key in client.scan_iter(f"{prefix}*"):
        await client.delete(key)
    await client.aclose()


async def test_conversations_round_trip_bounded_and_private(store: ConversationStore) -> None:
    conversation = Conversation.new("alice")
    conversation.system = ["Be brief."]
    vectors = [np.arange(8, dtype=np.float32) / 7, np.full(8, -1.5, dtype=np.float32)]
    conversation.turns = [StoredTurn("user", "hi", vectors), StoredTurn("assistant", "hello", [], ["image/k.png"], ["a" * 32])]
    await store.save(conversation)
    loaded = await store.load(conversation.id, "alice")
    assert loaded is not None and [t.text for t in loaded.turns] == ["hi", "hello"]
    np.testing.assert_array_equal(np.stack(loaded.turns[0].vectors), np.stack(vectors))
    assert loaded.turns[1].artifact_keys == ["image/k.png"] and loaded.turns[1].pending_jobs == ["a" * 32]
    assert await store.load(conversation.id, "mallory") is None
    assert await store.load(conversation.id, None) is None
    loaded.turns += [StoredTurn("user", f"u{i}") for i in range(5)]
    await store.save(loaded)
    bounded = await store.load(conversation.id, "alice")
    assert bounded is not None and [t.text for t in bounded.turns] == ["u1", "u2", "u3", "u4"]
    assert bounded.system == ["Be brief."]  # the first turn left, its system stays with the conversation


async def test_turns_of_one_conversation_saved_at_once_are_all_kept(store: ConversationStore) -> None:
    """Two turns loaded before either saved: each keeps its exchange, in the order they saved; what one turn does
    to its loaded copy (media encoded into an earlier turn) touches neither the other's copy nor the store."""
    conversation = Conversation.new("alice")
    conversation.turns = [StoredTurn("user", "u0"), StoredTurn("assistant", "a0", [], ["image/k.png"])]
    await store.save(conversation)
    first, second = await store.load(conversation.id, "alice"), await store.load(conversation.id, "alice")
    assert first is not None and second is not None
    first.turns[1].vectors.append(np.ones(4, dtype=np.float32))
    first.turns[1].artifact_keys.clear()
    assert second.turns[1].artifact_keys == ["image/k.png"] and not second.turns[1].vectors
    second.turns += [StoredTurn("user", "u2"), StoredTurn("assistant", "a2")]
    await store.save(second)
    first.turns += [StoredTurn("user", "u1"), StoredTurn("assistant", "a1")]
    await store.save(first)
    kept = await store.load(conversation.id, "alice")
    assert kept is not None and [t.text for t in kept.turns] == ["u2", "a2", "u1", "a1"]  # bounded to 4
    # A save with nobody in between writes the turn's own copy whole: its changes to loaded turns stay.
    kept.turns[0].vectors.append(np.full(4, 2.0, dtype=np.float32))
    kept.turns += [StoredTurn("user", "u3")]
    await store.save(kept)
    again = await store.load(conversation.id, "alice")
    assert again is not None and [t.text for t in again.turns] == ["a2", "u1", "a1", "u3"]
    # Saved twice by its own turn (a caller saving again after more work): the second is not a merge with itself.
    again.turns += [StoredTurn("assistant", "a3")]
    await store.save(again)
    again.turns += [StoredTurn("user", "u4")]
    await store.save(again)
    last = await store.load(conversation.id, "alice")
    assert last is not None and [t.text for t in last.turns] == ["a1", "u3", "a3", "u4"]


async def test_many_turns_saving_at_once_lose_none(redis_info: RedisInfo) -> None:
    """Eight turns of one conversation saved concurrently (on Redis: eight connections racing under WATCH)."""
    client = redis.asyncio.Redis.from_url(redis_info.url)
    prefix = f"{redis_info.key_prefix}conv-race-{uuid.uuid4().hex[:6]}:"
    for store in (MemoryConversationStore(max_turns=64), RedisConversationStore(client, prefix, 60, max_turns=64)):
        conversation = Conversation.new(None)
        await store.save(conversation)
        loaded = [await store.load(conversation.id, None) for _ in range(8)]
        for n, copy in enumerate(loaded):
            assert copy is not None
            copy.turns += [StoredTurn("user", f"u{n}"), StoredTurn("assistant", f"a{n}")]
        await asyncio.gather(*(store.save(copy) for copy in loaded if copy is not None))
        kept = await store.load(conversation.id, None)
        assert kept is not None and len(kept.turns) == 16
        texts = [t.text for t in kept.turns]
        assert sorted(texts[0::2]) == [f"u{n}" for n in range(8)]
        assert [t.replace("u", "a") for t in texts[0::2]] == texts[1::2]  # each exchange whole, in one piece
    await client.aclose()


class _RecordingLLM(LLMClient):
    """Answers each turn after a pause (so turns overlap) and records the conversation each was given."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    async def generate(self, params: GenerateParams, media: np.ndarray | None) -> AsyncIterator[LLMEvent]:
        self.seen.append([t.text for t in params.turns])
        await asyncio.sleep(0.2)
        yield TextDelta(f"re {params.turns[-1].text}")
        yield Done(finish_reason="stop", prompt_tokens=1, completion_tokens=1)

    async def check_ready(self) -> None:
        return None


async def test_a_client_that_does_not_wait_loses_no_turn(redis_info: RedisInfo) -> None:
    """Through the chat service: three follow-ups sent at once to one conversation, then a fourth; the fourth
    sees all three exchanges (before, the last to finish overwrote the others)."""
    client = redis.asyncio.Redis.from_url(redis_info.url)
    prefix = f"{redis_info.key_prefix}conv-chat-{uuid.uuid4().hex[:6]}:"
    for conversations in (MemoryConversationStore(), RedisConversationStore(client, prefix, 60)):
        llm = _RecordingLLM()
        chat = ChatService(cast(EncoderClient, None), llm, cast(DecoderQueue, None), cast(ArtifactStore, None),
                           conversations)

        async def turn(text: str, conversation_id: str | None) -> str:
            request = ChatRequest.model_validate(
                {"messages": [{"role": "user", "content": text}], "conversation_id": conversation_id})
            conversation, params, media = await chat.prepare(request, {}, None)
            events = [e async for e in chat.run(request, conversation, params, media, str, None)]
            done = events[-1]
            assert isinstance(done, TurnDone)
            return done.conversation_id

        cid = await turn("first", None)
        await asyncio.gather(*(turn(text, cid) for text in ("one", "two", "three")))
        await turn("last", cid)
        assert llm.seen[-1][:2] == ["first", "re first"] and llm.seen[-1][-1] == "last"
        middle = llm.seen[-1][2:-1]
        assert sorted(middle[0::2]) == ["one", "three", "two"]
        assert [f"re {t}" for t in middle[0::2]] == middle[1::2]
    await client.aclose()


async def test_redis_history_expires(redis_info: RedisInfo) -> None:
    client = redis.asyncio.Redis.from_url(redis_info.url)
    prefix = f"{redis_info.key_prefix}conv-ttl-{uuid.uuid4().hex[:6]}:"
    store = RedisConversationStore(client, prefix, ttl_s=1)
    conversation = Conversation.new(None)
    await store.save(conversation)
    assert 0 < await client.ttl(f"{prefix}conversation:{conversation.id}") <= 1
    await asyncio.sleep(1.5)
    assert await store.load(conversation.id, None) is None
    await client.aclose()


async def test_a_redis_reader_does_not_wait_forever_on_a_vanished_stream(redis_info: RedisInfo) -> None:
    client = redis.asyncio.Redis.from_url(redis_info.url)
    prefix = f"{redis_info.key_prefix}gone-{uuid.uuid4().hex[:6]}:"
    log = RedisEventLog(client, prefix, 100, ttl_s=60, block_ms=100)
    elsewhere = RedisEventLog(client, prefix, 100, ttl_s=60, block_ms=100)  # a reader on another replica
    stream_id = uuid.uuid4().hex
    await log.create(stream_id, None, 5.0)
    reader = elsewhere.read(stream_id, 0)
    first = asyncio.ensure_future(anext(reader))
    await asyncio.sleep(0.5)  # no event yet (a slow first token): still waiting, not gone
    assert not first.done()
    await log.append(stream_id, 1, "message.delta", {"text": "a"})
    assert [e[0] for e in await asyncio.wait_for(first, 5)] == [1]
    # Quiet is not gone: a stream that is alive but slow keeps its reader waiting.
    waiting = asyncio.ensure_future(anext(reader))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    await log.append(stream_id, 2, "message.delta", {"text": "b"})
    assert [e[0] for e in await asyncio.wait_for(waiting, 5)] == [2]
    # Its producer died and the keys expired.
    await client.delete(f"{prefix}chatstream:{stream_id}", f"{prefix}chatstream:{stream_id}:owner")
    with pytest.raises(GoneError, match="ended without finishing"):
        await asyncio.wait_for(anext(reader), 5)
    async for key in client.scan_iter(f"{prefix}*"):
        await client.delete(key)
    await client.aclose()


# A gateway replica producing one stream: three events, a quiet spell of three leases (a long prefill, a decode
# with no progress), then an event every 50 ms until it is killed.
_PRODUCER = """
import asyncio, sys
import redis.asyncio
from gateway.streams import RedisEventLog, StreamHub
from gateway.turn_events import MessageDelta

async def turn():
    for i in range(100_000):
        if i == 3:
            await asyncio.sleep(3.0)
        await asyncio.sleep(0.05)
        yield MessageDelta(f"t{i}")

async def main():
    client = redis.asyncio.Redis.from_url(sys.argv[1])
    hub = StreamHub(RedisEventLog(client, sys.argv[2], 100_000, ttl_s=60, block_ms=200, lease_s=1.0), grace_s=30,
                    touch_every_s=0.1)
    print(await hub.start(turn(), owner=None), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_stream_whose_replica_died_ends_for_its_readers_elsewhere_within_the_lease(
        redis_info: RedisInfo) -> None:
    """A replica killed mid-turn writes no end. Its stream's readers on other replicas (clients that reconnected
    through the load balancer) get ``stream_gone`` once the producer's lease has lapsed (1 s here, 15 s by
    default), where they waited for the stream's whole ``ttl_s`` (60 s here, 300 s by default); a producer that
    is alive but quiet for three leases keeps them waiting."""
    import subprocess
    import sys
    from pathlib import Path

    client = async_redis(redis_info.url)
    prefix = f"{redis_info.key_prefix}lease-{uuid.uuid4().hex[:6]}:"
    producer = subprocess.Popen([sys.executable, "-c", _PRODUCER, redis_info.url, prefix], stdout=subprocess.PIPE,
                                text=True, cwd=Path(__file__).parents[2])
    elsewhere = StreamHub(RedisEventLog(client, prefix, 100_000, ttl_s=60, block_ms=200, lease_s=1.0), grace_s=30,
                          touch_every_s=0.1)
    try:
        assert producer.stdout is not None
        stream_id = (await asyncio.wait_for(asyncio.to_thread(producer.stdout.readline), 60)).strip()
        entries = _flat(await elsewhere.attach(stream_id, None))
        got = [await asyncio.wait_for(anext(entries), 10) for _ in range(3)]
        quiet = time.monotonic()
        got.append(await asyncio.wait_for(anext(entries), 10))  # through the quiet spell: not gone
        assert time.monotonic() - quiet > 2.5 and [e[0] for e in got] == [1, 2, 3, 4]
        got += [await asyncio.wait_for(anext(entries), 10) for _ in range(5)]
        producer.kill()
        producer.wait()
        killed = time.monotonic()
        with pytest.raises(GoneError, match="ended without finishing") as gone:
            while True:
                got.append(await asyncio.wait_for(anext(entries), 30))
        assert gone.value.code == "stream_gone"
        assert time.monotonic() - killed < 1.0 + 2.0, "the reader waited past the lease"
        assert [e[0] for e in got] == list(range(1, len(got) + 1))  # every event written before the kill
    finally:
        producer.kill()
        await elsewhere.close()
        async for key in client.scan_iter(f"{prefix}*"):
            await client.delete(key)
        await client.aclose()


async def test_resuming_past_the_end_of_a_stream_ends_instead_of_waiting(make_log: Factory) -> None:
    hub = StreamHub(make_log(1000), grace_s=5, touch_every_s=0.1)
    stream_id = await hub.start(Turn(3).events(), owner="alice")
    entries = await asyncio.wait_for(_drain(await hub.attach(stream_id, "alice")), 20)
    done_id = entries[-1][0]
    assert entries[-1][1] == "done"
    # After the last event: nothing more, and the reader ends.
    assert await asyncio.wait_for(_drain(await hub.attach(stream_id, "alice", after=done_id)), 5) == []
    # Beyond it: a clear 400 that names the last event, not heartbeats forever.
    for after in (done_id + 1, done_id + 50):
        with pytest.raises(InvalidRequestError, match=f"ended at event {done_id}"):
            await hub.attach(stream_id, "alice", after=after)


async def test_a_reader_ahead_of_a_live_stream_ends_when_the_stream_does(make_log: Factory) -> None:
    hub = StreamHub(make_log(1000), grace_s=5, touch_every_s=0.1)
    stream_id = await hub.start(Turn(5, every_s=0.1).events(), owner="alice")
    ahead = await hub.attach(stream_id, "alice", after=500)  # the stream is still running: nothing to refuse yet
    assert await asyncio.wait_for(_drain(ahead), 20) == []


async def _blocked_reads(client: Any) -> int:
    clients = await client.execute_command("CLIENT", "LIST")
    text = clients.decode() if isinstance(clients, bytes) else str(clients)
    return sum(1 for line in text.splitlines() if "cmd=xread" in line and "flags=b" in line)


async def test_a_token_by_token_stream_reaches_redis_first_event_at_once_then_in_few_writes(
        redis_info: RedisInfo) -> None:
    """Tokens a few ms apart (a fast LLM) used to cost one transaction each; after the first, they linger."""
    client = async_redis(redis_info.url)
    watcher = redis.asyncio.Redis.from_url(redis_info.url)
    prefix = f"{redis_info.key_prefix}linger-{uuid.uuid4().hex[:6]}:"
    hub = StreamHub(RedisEventLog(client, prefix, 1000, ttl_s=60, linger_s=0.5), grace_s=5)
    key = f"{prefix}chatstream:{{}}"

    # The first event is not held back by the linger: Redis has it while the second is 2 s away.
    stream_id = await hub.start(Turn(2, every_s=1.0).events(), owner=None)
    reader = await hub.attach(stream_id, None)
    first = await asyncio.wait_for(reader.__anext__(), 5)
    assert [e[0] for e in first] == [1]
    for _ in range(40):
        if await watcher.xlen(key.format(stream_id)) >= 1:
            break
        await asyncio.sleep(0.005)
    assert await watcher.xlen(key.format(stream_id)) == 1  # within 0.2 s of the local reader, not 0.5 s
    await asyncio.wait_for(_drain(reader), 10)

    # 40 tokens 5 ms apart: a handful of writes, every event stored in order, the end without waiting.
    before = await redis_transactions(watcher)
    stream_id = await hub.start(Turn(40, every_s=0.005).events(), owner=None)
    local = await asyncio.wait_for(_drain(await hub.attach(stream_id, None)), 10)
    assert [e[0] for e in local] == list(range(1, 42))
    for _ in range(200):
        if await watcher.xlen(key.format(stream_id)) == 42:
            break
        await asyncio.sleep(0.01)
    stored = await watcher.xrange(key.format(stream_id))
    assert [int(i.split(b"-")[0]) for i, _ in stored] == list(range(1, 43))  # 41 events and the end marker
    writes = await redis_transactions(watcher) - before
    assert writes <= 4, writes  # the first, then the rest at 0.5 s apart: 40 x 5 ms fits in one more, the end
    await hub.close()
    async for k in client.scan_iter(f"{prefix}*"):
        await client.delete(k)
    await client.aclose()
    await watcher.aclose()


async def test_readers_on_the_producing_replica_hold_no_redis_connection_and_writes_coalesce(
        redis_info: RedisInfo) -> None:
    client = async_redis(redis_info.url)
    watcher = redis.asyncio.Redis.from_url(redis_info.url)
    prefix = f"{redis_info.key_prefix}hot-{uuid.uuid4().hex[:6]}:"
    here = RedisEventLog(client, prefix, 1000, ttl_s=60, block_ms=2000)
    hub = StreamHub(here, grace_s=5, touch_every_s=0.1)
    slow = Turn(1, every_s=1.5)
    stream_id = await hub.start(slow.events(), owner=None)
    reading = asyncio.ensure_future(_drain(await hub.attach(stream_id, None)))
    await asyncio.sleep(0.5)  # the reader waits for the first token
    assert await _blocked_reads(watcher) == 0
    elsewhere = StreamHub(RedisEventLog(client, prefix, 1000, ttl_s=60, block_ms=2000), grace_s=5)
    remote = asyncio.ensure_future(_drain(await elsewhere.attach(stream_id, None)))
    await asyncio.sleep(0.3)
    assert await _blocked_reads(watcher) == 1  # a reader on another replica: one connection, in a blocking read
    assert [e[0] for e in await asyncio.wait_for(reading, 10)] == [1, 2]
    assert [e[0] for e in await asyncio.wait_for(remote, 10)] == [1, 2]

    # A burst of events goes to Redis in fewer writes than events, all of them, in order.
    before = await redis_transactions(watcher)
    stream_id = await hub.start(Turn(300).events(), owner=None)
    local = await asyncio.wait_for(_drain(await hub.attach(stream_id, None)), 20)
    # The reader here saw the end from memory; the producer finishes once Redis has it too.
    for _ in range(100):
        if await watcher.xlen(f"{prefix}chatstream:{stream_id}") == 302:
            break
        await asyncio.sleep(0.05)
    writes = await redis_transactions(watcher) - before
    stored = await watcher.xrange(f"{prefix}chatstream:{stream_id}")
    assert [int(i.split(b"-")[0]) for i, _ in stored] == list(range(1, 303))  # 301 events and the end marker
    assert [e[0] for e in local] == list(range(1, 302))
    assert writes < 150, writes
    await hub.close()
    await elsewhere.close()
    async for key in client.scan_iter(f"{prefix}*"):
        await client.delete(key)
    await client.aclose()
    await watcher.aclose()


async def test_inline_media_past_the_bound_stay_out_of_redis(redis_info: RedisInfo) -> None:
    """A reader here gets an artifact's inline bytes whole; Redis, which resumes on other replicas read, keeps
    only those within ``inline_max_bytes`` (a larger artifact keeps its URL, and says why it has no data)."""
    client = async_redis(redis_info.url)
    prefix = f"{redis_info.key_prefix}inline-{uuid.uuid4().hex[:6]}:"
    here = StreamHub(RedisEventLog(client, prefix, 100, ttl_s=60, inline_max_bytes=1000), grace_s=5)
    elsewhere = StreamHub(RedisEventLog(client, prefix, 100, ttl_s=60, inline_max_bytes=1000), grace_s=5)

    async def media() -> AsyncIterator[TurnEvent]:
        for job, size in (("a" * 32, 1000), ("b" * 32, 1001)):
            yield ArtifactCompleted(ArtifactOut(job_id=job, modality="image", state="completed", url=f"/{job}",
                                                data="x" * size))
        yield TurnDone(conversation_id="c", finish_reason="stop", text="", usage={})

    stream_id = await here.start(media(), owner=None)
    local = await asyncio.wait_for(_drain(await here.attach(stream_id, None)), 20)
    remote = await asyncio.wait_for(_drain(await elsewhere.attach(stream_id, None)), 20)  # read from Redis
    assert [len(e[2]["data"]) for e in local[:2]] == [1000, 1001]
    assert [e[2]["data"] for e in remote[:2]] == ["x" * 1000, None]
    assert remote[1][2]["url"] == "/" + "b" * 32 and "1001 > 1000" in remote[1][2]["error"]
    await here.close()
    await elsewhere.close()
    async for key in client.scan_iter(f"{prefix}*"):
        await client.delete(key)
    await client.aclose()


async def _calls(watcher: redis.asyncio.Redis, *commands: str) -> int:
    stats = await watcher.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands)


async def test_the_producer_asks_redis_once_a_round_wherever_its_reader_is(redis_info: RedisInfo) -> None:
    """While its turn runs, the producer asks every ``touch_every_s`` whether it was cancelled and whether anyone
    still reads it: one command a round, also when the reader is on another replica (it was two)."""
    client = async_redis(redis_info.url)
    watcher = redis.asyncio.Redis.from_url(redis_info.url)
    prefix = f"{redis_info.key_prefix}rounds-{uuid.uuid4().hex[:6]}:"
    # A new stream counts as read here for grace_s + 2 touch_every_s (0.7 s): after that, only Redis knows.
    hub = StreamHub(RedisEventLog(client, prefix, 1000, ttl_s=60, block_ms=5000), grace_s=0.5, touch_every_s=0.1)
    elsewhere = StreamHub(RedisEventLog(client, prefix, 1000, ttl_s=60, block_ms=5000), grace_s=0.5,
                          touch_every_s=10)  # its one touch keeps the stream read for 20.5 s
    slow = Turn(1, every_s=3.4)  # under way through the 2 s counted
    stream_id = await hub.start(slow.events(), owner=None)
    remote = asyncio.ensure_future(_drain(await elsewhere.attach(stream_id, None)))
    await asyncio.sleep(1.0)
    before, started = await _calls(watcher, "exists", "mget", "get"), time.monotonic()
    await asyncio.sleep(2.0)
    asked = await _calls(watcher, "exists", "mget", "get") - before
    rounds = (time.monotonic() - started) / 0.1
    assert asked <= rounds + 3, (asked, rounds)  # two a round would be about 40
    assert [e[0] for e in await asyncio.wait_for(remote, 10)] == [1, 2]  # and the remote reader kept it alive
    await hub.close()
    await elsewhere.close()
    async for key in client.scan_iter(f"{prefix}*"):
        await client.delete(key)
    await client.aclose()
    await watcher.aclose()


@pytest.mark.parametrize("every_s", [0.01, 30.0], ids=["emitting", "quiet"])
async def test_a_stream_whose_owner_key_cannot_be_written_is_refused_and_its_turn_closed(
        every_s: float, caplog: pytest.LogCaptureFixture) -> None:
    """The owner key is written while the turn starts; when that write fails, nobody may learn of the stream
    (start raises) and the turn already under way is closed (its generation cancelled), not left running. Before,
    an emitting turn was closed only by crashing on its next event (the stream already ended: a KeyError in the
    log), and a quiet one (an LLM still prefilling) went on for nobody."""
    from tests.support.servers import free_port

    dead = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=1)  # nothing listens there
    hub = StreamHub(RedisEventLog(dead, "dead:", 100, ttl_s=60), grace_s=5, touch_every_s=0.1)
    turn = Turn(1000, every_s=every_s)
    with pytest.raises(redis.exceptions.ConnectionError):
        await hub.start(turn.events(), owner=None)
    await asyncio.wait_for(turn.closed.wait(), 2)
    assert turn.emitted < 1000
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    await hub.close()
    await dead.aclose()


async def test_a_quiet_stream_gives_its_reader_empty_batches_for_heartbeats(make_log: Factory) -> None:
    """Nothing for ``idle_s`` (a slow first token, a long decode): the reader gets an empty batch (the SSE route
    sends a heartbeat for it), again while the quiet lasts, and the events after it as they come."""
    hub = StreamHub(make_log(1000), grace_s=5, touch_every_s=0.1)
    stream_id = await hub.start(Turn(1, every_s=0.9).events(), owner=None)
    reader = await hub.attach(stream_id, None, idle_s=0.2)
    started = time.monotonic()
    quiet = [await asyncio.wait_for(anext(reader), 5) for _ in range(3)]
    assert quiet == [[], [], []] and 0.5 < time.monotonic() - started < 0.85
    rest = [e for batch in await asyncio.wait_for(_drain_batches(reader), 10) for e in batch]
    assert [e[1] for e in rest] == ["message.delta", "done"]
    await hub.close()


async def _drain_batches(reader: AsyncIterator[list[Any]]) -> list[list[Any]]:
    return [batch async for batch in reader]
