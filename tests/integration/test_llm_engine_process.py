"""The transformers backend's engine in its own process: the same replies as in-process, errors that keep their
kind, cancellation across the pipe, and a dead engine that fails what it held and says so."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from services.bundle.loader import load_bundle
from services.contracts.errors import InvalidRequestError, ServiceUnavailableError
from services.contracts.llm import Done, GenerateParams, LLMEvent, SignalEvent, TextDelta, Turn
from services.llm.engine_process import EngineProcess, EngineSpec
from services.llm.hf_backend import HFBackend

MEDIA = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)


def _spec(bundle: Path) -> EngineSpec:
    return EngineSpec(bundle, "cpu", "float32", None, max_batch=4, max_requests=8, threads=1)


@pytest.fixture(scope="module")
def engine(tiny_bundle_dir: Path) -> Iterator[EngineProcess]:
    process = EngineProcess(_spec(tiny_bundle_dir))
    yield process
    process.close()


def _params(**kw: object) -> GenerateParams:
    return GenerateParams(turns=[Turn(role="user", text="show me a picture", media=[0])], seed=3, **kw)  # type: ignore[arg-type]


def _run(backend: HFBackend | EngineProcess, params: GenerateParams, cancel: threading.Event | None = None,
         on_event: object = None) -> list[LLMEvent]:
    events: list[LLMEvent] = []

    def emit(event: LLMEvent) -> None:
        events.append(event)
        if on_event is not None:
            on_event(event)  # type: ignore[operator]

    backend.generate(params, MEDIA, emit, cancel or threading.Event())
    return events


def test_replies_equal_the_in_process_backend(engine: EngineProcess, tiny_bundle_dir: Path) -> None:
    local = HFBackend(load_bundle(tiny_bundle_dir), max_batch=4)
    try:
        for params in (_params(max_tokens=40, require_modalities=["image", "audio"]),
                       _params(max_tokens=30, temperature=0.8, top_p=0.9)):
            ours, theirs = _run(engine, params), _run(local, params)
            assert isinstance(ours[-1], Done) and isinstance(theirs[-1], Done)
            assert ours[-1].token_ids == theirs[-1].token_ids
            assert "".join(e.text for e in ours if isinstance(e, TextDelta)) == \
                "".join(e.text for e in theirs if isinstance(e, TextDelta))
            a = [e for e in ours if isinstance(e, SignalEvent)]
            b = [e for e in theirs if isinstance(e, SignalEvent)]
            assert [s.modality for s in a] == [s.modality for s in b]
            assert all(np.allclose(x.conditioning, y.conditioning, atol=1e-5) for x, y in zip(a, b))
    finally:
        local.close()


def test_errors_cross_the_pipe_with_their_kind(engine: EngineProcess) -> None:
    with pytest.raises(InvalidRequestError, match="unknown LoRA") as caught:
        _run(engine, _params(lora="nope"))
    assert caught.value.code == "unknown_lora" and caught.value.param == "lora"


def test_cancel_reaches_the_engine(engine: EngineProcess) -> None:
    cancel = threading.Event()
    events = _run(engine, _params(max_tokens=400), cancel, lambda e: cancel.set())
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "cancelled" and done.completion_tokens < 100


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def _long_reply(engine: EngineProcess) -> tuple[threading.Thread, list[BaseException]]:
    """A long reply on its own thread, returned once its first event came; ``outcome`` gets what it raised."""
    outcome: list[BaseException] = []
    started = threading.Event()

    def run() -> None:
        try:
            _run(engine, _params(max_tokens=2000), on_event=lambda e: started.set())
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(60)
    return thread, outcome


def test_a_dead_engine_fails_its_replies_and_reports_itself(tiny_bundle_dir: Path) -> None:
    exits: list[str] = []
    engine = EngineProcess(_spec(tiny_bundle_dir), on_exit=exits.append)
    try:
        thread, outcome = _long_reply(engine)
        os.kill(engine._process.pid, signal.SIGKILL)  # noqa: SLF001 - the fault injected
        thread.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], ServiceUnavailableError)
        assert outcome[0].code == "llm_engine_exited"
        _wait_for(lambda: bool(exits))  # told on the reader thread just after the replies are failed
        assert len(exits) == 1 and not engine.alive
        with pytest.raises(ServiceUnavailableError):
            engine.check_alive()
        with pytest.raises(ServiceUnavailableError):
            _run(engine, _params(max_tokens=4))
    finally:
        engine.close()


def test_a_hung_engine_is_killed_and_fails_its_replies(tiny_bundle_dir: Path) -> None:
    """The child frozen mid-reply (SIGSTOP: a deadlock, a wedged device): after ``stall_s`` of silence with a
    reply under way it is killed, the reply fails with 503 and the server is told (it stops, for its supervisor
    to restart it), rather than every slot waiting forever behind a server that still looks ready."""
    exits: list[str] = []
    engine = EngineProcess(_spec(tiny_bundle_dir), on_exit=exits.append, stall_s=2.0)
    try:
        time.sleep(3)  # idle longer than stall_s: silence with nothing under way is not a stall
        assert engine.alive and _run(engine, _params(max_tokens=4))
        thread, outcome = _long_reply(engine)
        frozen = time.monotonic()
        os.kill(engine._process.pid, signal.SIGSTOP)  # noqa: SLF001 - the fault injected
        thread.join(30)
        assert 2.0 <= time.monotonic() - frozen < 10
        assert len(outcome) == 1 and isinstance(outcome[0], ServiceUnavailableError)
        assert outcome[0].code == "llm_engine_exited" and "hung" in outcome[0].message
        _wait_for(lambda: bool(exits))
        assert "hung" in exits[0] and not engine.alive
    finally:
        engine.close()
