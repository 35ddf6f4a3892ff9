"""A streamed turn waits for the LLM's ``accepted`` before it answers (so that a refusal gets its own status). A
client that gives up meanwhile (its timeout, while the LLM is queueing under load) never got the answer's start,
so it cannot read or resume the stream: its turn ends at once, not after the grace a stream's reader gets."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import numpy as np
import pytest

from gateway.app import GatewayState, ModelCard, build_app
from gateway.chat import ChatService
from gateway.conversations import MemoryConversationStore
from gateway.streams import MemoryEventLog, StreamHub
from services.contracts.llm import Accepted, Done, GenerateParams, LLMClient, LLMEvent, TextDelta
from services.contracts.settings import Settings
from services.decoders.local_queue import LocalDecoderQueue
from services.jobs.book import MemoryJobBook
from services.storage import build_artifact_store
from tests.support.encoders import NoEncoder
from tests.support.servers import UvicornThread

QUEUED_S = 1.5  # until the LLM takes the turn
GRACE_S = 30.0  # what a stream nobody reads gets before it is cancelled


class QueueingLLM(LLMClient):
    """Takes each turn after QUEUED_S, then streams a long reply; records when each generation ended."""

    def __init__(self) -> None:
        self.ended: list[float] = []
        self.lock = threading.Lock()

    async def generate(self, params: GenerateParams, media: np.ndarray | None) -> AsyncIterator[LLMEvent]:
        try:
            await asyncio.sleep(QUEUED_S)
            yield Accepted(prompt_tokens=3)
            for _ in range(3000):
                await asyncio.sleep(0.01)
                yield TextDelta(".")
            yield Done(finish_reason="length", prompt_tokens=3, completion_tokens=3000)
        finally:
            with self.lock:
                self.ended.append(time.monotonic())

    async def check_ready(self) -> None:
        return None


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, QueueingLLM]]:
    settings = Settings(cache_dir=tmp_path_factory.mktemp("cache"))
    store = build_artifact_store(settings)
    book = MemoryJobBook()
    decoders = LocalDecoderQueue(lambda jobs: None, book)  # type: ignore[arg-type,return-value]  # never used
    llm = QueueingLLM()
    chat = ChatService(NoEncoder(), llm, decoders, store, MemoryConversationStore())
    state = GatewayState(models=[ModelCard(id="nextgpt")], readiness_checks={}, chat=chat, store=store, decoders=decoders,
                         streams=StreamHub(MemoryEventLog(10_000, 60), grace_s=GRACE_S, touch_every_s=0.2),
                         on_shutdown=[decoders.close])
    with UvicornThread(build_app(state)) as server:
        yield server.url, llm


@pytest.mark.parametrize("path, body", [
    ("/v1/chat", {"messages": [{"role": "user", "content": "a long story"}], "stream": True}),
    ("/v1/chat/completions", {"model": "nextgpt", "messages": [{"role": "user", "content": "a long story"}],
                              "stream": True}),
])
def test_a_client_gone_before_the_llm_takes_its_turn_ends_the_turn(served: tuple[str, QueueingLLM], path: str,
                                                                    body: dict[str, object]) -> None:
    url, llm = served
    before = len(llm.ended)
    with pytest.raises(httpx.ReadTimeout):  # it gives up while the LLM is still queueing
        httpx.post(f"{url}{path}", json=body, timeout=httpx.Timeout(5.0, read=0.3))
    gone = time.monotonic()
    # Ended before the LLM would even have taken the turn (the grace would have kept it 30 s).
    deadline = gone + QUEUED_S - 0.5
    while len(llm.ended) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(llm.ended) > before, "the generation went on for a client that was gone"


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway whose streams are cancelled after a grace shorter than the LLM takes to accept a turn."""
    settings = Settings(cache_dir=tmp_path_factory.mktemp("cache"))
    store = build_artifact_store(settings)
    book = MemoryJobBook()
    decoders = LocalDecoderQueue(lambda jobs: None, book)  # type: ignore[arg-type,return-value]  # never used
    chat = ChatService(NoEncoder(), QueueingLLM(), decoders, store, MemoryConversationStore())
    state = GatewayState(models=[ModelCard(id="nextgpt")], readiness_checks={}, chat=chat, store=store,
                         decoders=decoders, streams=StreamHub(MemoryEventLog(10_000, 60), grace_s=QUEUED_S / 3,
                                                              touch_every_s=0.1),
                         on_shutdown=[decoders.close])
    with UvicornThread(build_app(state)) as server:
        yield server.url


def test_a_connected_client_waiting_for_the_llm_to_take_its_turn_is_reading_its_stream(impatient: str) -> None:
    # Before: nobody had touched the stream while its answer waited for `accepted`, so past the grace the turn was
    # cancelled as abandoned and the waiting client got a 500.
    body = {"messages": [{"role": "user", "content": "a long story"}], "stream": True}
    names = []
    with httpx.stream("POST", f"{impatient}/v1/chat", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():  # a second of the reply: twice the grace, read all the while
            if line.startswith("event: "):
                names.append(line[7:])
                if len(names) == 100 or names[-1] == "error":
                    break
    assert names == ["message.delta"] * 100


def test_a_stream_that_cannot_be_set_up_is_a_503_and_its_turn_ends(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The stream log's Redis is down: the stream's owner key cannot be written, so nobody may learn of the stream.
    # Before: a 500, and the turn already under way generated on for nobody.
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from gateway.streams import RedisEventLog
    from tests.support.servers import free_port

    settings = Settings(cache_dir=tmp_path_factory.mktemp("cache"))
    store = build_artifact_store(settings)
    book = MemoryJobBook()
    decoders = LocalDecoderQueue(lambda jobs: None, book)  # type: ignore[arg-type,return-value]  # never used
    llm = QueueingLLM()
    dead = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    state = GatewayState(models=[ModelCard(id="nextgpt")], readiness_checks={}, decoders=decoders, store=store,
                         chat=ChatService(NoEncoder(), llm, decoders, store, MemoryConversationStore()),
                         streams=StreamHub(RedisEventLog(dead, "dead:", 100, ttl_s=60), grace_s=GRACE_S),
                         on_shutdown=[decoders.close])
    with UvicornThread(build_app(state)) as server:
        response = httpx.post(f"{server.url}/v1/chat", json={"messages": [{"role": "user", "content": "a story"}],
                                                             "stream": True}, timeout=30)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "redis_unavailable" and response.headers["retry-after"]
        deadline = time.monotonic() + QUEUED_S + 2
        while not llm.ended and time.monotonic() < deadline:
            time.sleep(0.02)
        assert llm.ended, "the turn went on with no stream to read it"
