"""Decoders overlap the text stream: when the model emits its signal group early in a long reply, the gateway
dispatches the decode job at once, and the artifact completes (and reaches the client) before the last token.

The tiny bundle's random weights cannot be steered to emit a group at a chosen place, so the LLM here is a
scripted stand-in speaking the LLMClient contract (three words, an image group, then a long tail of text paced
like a slow model). Everything else is real: the gateway over HTTP, ChatService, the local decoder pool running
the tiny Stable Diffusion pipeline, the artifact store and the signed download."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from gateway.app import GatewayState, build_app
from gateway.chat import ChatService
from gateway.conversations import MemoryConversationStore
from services.bundle.loader import load_bundle
from services.contracts.errors import ServiceUnavailableError
from services.contracts.llm import Done, GenerateParams, LLMClient, LLMEvent, SignalEvent, TextDelta
from services.contracts.settings import Settings
from services.decoders.compose import build_runner
from services.decoders.local_queue import LocalDecoderQueue
from services.jobs.book import MemoryJobBook
from services.storage import build_artifact_store
from tests.support.encoders import NoEncoder
from tests.support.servers import UvicornThread, wait_until

TAIL_TOKENS, TOKEN_S = 300, 0.02  # ~6 s of text after the group


class EarlySignalLLM(LLMClient):
    def __init__(self, conditioning_shape: tuple[int, ...]) -> None:
        self.shape = conditioning_shape

    async def generate(self, params: GenerateParams, media: np.ndarray | None) -> AsyncIterator[LLMEvent]:
        for word in ("Here", " it", " is"):
            yield TextDelta(word)
        conditioning = np.random.default_rng(0).standard_normal(self.shape).astype(np.float32)
        yield SignalEvent(modality="image", index=0, conditioning=conditioning)
        for _ in range(TAIL_TOKENS):
            await asyncio.sleep(TOKEN_S)
            yield TextDelta(".")
        yield Done(finish_reason="stop", prompt_tokens=5, completion_tokens=TAIL_TOKENS + 3 + 4)

    async def check_ready(self) -> None:
        return None


@pytest.fixture(scope="module")
def url(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(cache_dir=tmp_path_factory.mktemp("cache"))
    bundle = load_bundle(tiny_bundle_dir)
    store = build_artifact_store(settings)
    book = MemoryJobBook()
    decoders = LocalDecoderQueue(build_runner(settings, bundle, ["image"], book), book)
    shape = tuple(bundle.manifest.outputs["image"].projector.output_shape)
    chat = ChatService(NoEncoder(), EarlySignalLLM(shape), decoders, store, MemoryConversationStore())
    state = GatewayState(models=[], readiness_checks={}, chat=chat, store=store, decoders=decoders,
                         on_shutdown=[decoders.close])
    with UvicornThread(build_app(state)) as server:
        yield server.url


def test_the_artifact_arrives_before_the_text_ends(url: str) -> None:
    request = {"messages": [{"role": "user", "content": "draw, then explain at length"}], "stream": True,
               "decoder": {"steps": 3}}
    arrivals: list[tuple[float, str, str]] = []
    started = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/chat", json=request, timeout=120) as response:
        assert response.status_code == 200
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                arrivals.append((time.monotonic() - started, name, line[6:]))
    names = [n for _, n, _ in arrivals]
    assert names[-1] == "done"
    completed = names.index("artifact.completed")
    last_delta = len(names) - 1 - names[::-1].index("message.delta")
    # The image reached the client while the reply still had most of its text to come.
    assert completed < last_delta
    deltas_after = names[completed:].count("message.delta")
    assert deltas_after > TAIL_TOKENS // 2, f"only {deltas_after} tokens after the artifact"
    artifact = json.loads(arrivals[completed][2])
    assert Image.open(io.BytesIO(httpx.get(artifact["url"]).content)).format == "PNG"


class _UnreadableStore:
    """The gateway's view of a store whose reads fail (S3 away for a moment) while the worker still writes."""

    def __init__(self, store: object) -> None:
        self._store = store

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        raise ServiceUnavailableError("the artifact store is unavailable; retry later", code="storage_unavailable")

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_inline_bytes_the_store_cannot_read_leave_the_artifact_completed_with_its_url(
        tiny_bundle_dir: Path, tmp_path: Path) -> None:
    # Before: the store's error ended the whole turn (an `error` event, the text's end and the media lost).
    settings = Settings(cache_dir=tmp_path)
    bundle = load_bundle(tiny_bundle_dir)
    store = build_artifact_store(settings)
    book = MemoryJobBook()
    decoders = LocalDecoderQueue(build_runner(settings, bundle, ["image"], book), book)
    shape = tuple(bundle.manifest.outputs["image"].projector.output_shape)
    chat = ChatService(NoEncoder(), EarlySignalLLM(shape), decoders, _UnreadableStore(store),  # type: ignore[arg-type]
                       MemoryConversationStore())
    state = GatewayState(models=[], readiness_checks={}, chat=chat, store=store, decoders=decoders,
                         on_shutdown=[decoders.close])
    with UvicornThread(build_app(state)) as server:
        body = httpx.post(f"{server.url}/v1/chat", timeout=120, json={
            "messages": [{"role": "user", "content": "draw"}], "inline_media": True, "decoder": {"steps": 2}}).json()
    artifact = body["artifacts"][0]
    assert body["finish_reason"] == "stop" and artifact["state"] == "completed" and artifact["data"] is None
    assert artifact["url"] and artifact["error"].startswith("storage_unavailable: ")


class _SlowConditioningStore:
    """The gateway's view of a store that takes its time to take a signal's conditioning (S3 slow to answer, up to
    its client's timeouts): each such put waits for ``gate``. Everything else goes to the real store."""

    def __init__(self, store: object) -> None:
        self._store, self.gate = store, threading.Event()
        self.held: list[str] = []  # the conditioning keys put so far (they name their job)

    def put(self, key: str, data: bytes, mime: str, **kwargs: object) -> object:
        if key.startswith("conditioning/"):
            self.held.append(key)
            assert self.gate.wait(60), "the test never opened the gate"
        return self._store.put(key, data, mime, **kwargs)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


@pytest.fixture
def slow_store_server(tiny_bundle_dir: Path, tmp_path: Path
                      ) -> Iterator[tuple[str, _SlowConditioningStore, MemoryJobBook, object]]:
    settings = Settings(cache_dir=tmp_path)
    bundle = load_bundle(tiny_bundle_dir)
    store = build_artifact_store(settings)
    slow = _SlowConditioningStore(store)
    book = MemoryJobBook()
    decoders = LocalDecoderQueue(build_runner(settings, bundle, ["image"], book), book)
    shape = tuple(bundle.manifest.outputs["image"].projector.output_shape)
    chat = ChatService(NoEncoder(), EarlySignalLLM(shape), decoders, slow,  # type: ignore[arg-type]
                       MemoryConversationStore())
    state = GatewayState(models=[], readiness_checks={}, chat=chat, store=store, decoders=decoders,
                         on_shutdown=[decoders.close])
    try:
        with UvicornThread(build_app(state)) as server:
            yield server.url, slow, book, store
    finally:
        slow.gate.set()


def test_the_words_go_on_while_a_signals_job_is_being_dispatched(
        slow_store_server: tuple[str, _SlowConditioningStore, MemoryJobBook, object]) -> None:
    # Before: the turn waited for the conditioning's put before its next word (the stream paused for as long as
    # the store took, up to its client's timeouts).
    url, slow, _, _ = slow_store_server
    request = {"messages": [{"role": "user", "content": "draw, then explain at length"}], "stream": True,
               "decoder": {"steps": 2}}
    names: list[str] = []
    opened = threading.Timer(2.0, slow.gate.set)
    with httpx.stream("POST", f"{url}/v1/chat", json=request, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                names.append(line[7:])
                if names[-1] == "signal":
                    opened.start()  # the put is held for 2 s from here
                elif names[-1] == "artifact.queued":
                    assert slow.gate.is_set()
    signal, queued = names.index("signal"), names.index("artifact.queued")
    # ~2 s at 20 ms a token: the reply's words kept coming while its job waited on the store.
    assert names[signal:queued].count("message.delta") > 40, names[signal:queued + 1]
    assert names.index("artifact.completed") > queued and names[-1] == "done"


def test_a_turn_cancelled_while_its_job_is_being_dispatched_runs_no_job(
        slow_store_server: tuple[str, _SlowConditioningStore, MemoryJobBook, object]) -> None:
    url, slow, book, _ = slow_store_server
    request = {"messages": [{"role": "user", "content": "draw"}], "stream": True, "decoder": {"steps": 2}}
    names: list[str] = []
    with httpx.stream("POST", f"{url}/v1/chat", json=request, timeout=120) as response:
        stream_id = response.headers["x-stream-id"]
        for line in response.iter_lines():
            if line.startswith("event: "):
                names.append(line[7:])
                if names[-1] == "signal":  # its job's dispatch is held at the store
                    wait_until(lambda: bool(slow.held), 10, "the conditioning's put")
                    assert httpx.post(f"{url}/v1/chat/streams/{stream_id}/cancel", timeout=10).status_code == 200
    assert names[-1] == "error" and "artifact.queued" not in names
    job_id = slow.held[0].rsplit("/", 1)[1].split(".")[0]
    slow.gate.set()  # the put goes through now: the job must not be sent, or not run
    time.sleep(2.0)  # time for a job that should not exist to run (2 steps take well under a second here)
    assert [e.type for e in book.events_after(job_id, 0)[0]] in ([], ["cancelled"]), "the cancelled turn's job ran"
