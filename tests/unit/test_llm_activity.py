"""``Activity``: who shares the machine with the LLM learns when it starts and stops generating; and the embedded
decoder process's threads while it does (``decoders.threads_beside_llm``)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from services.cli.compose import decoder_threads_beside_llm
from services.contracts.settings import Settings
from services.llm.activity import Activity


def test_listeners_hear_when_generating_starts_and_ends_once_per_change() -> None:
    activity = Activity()
    heard: list[bool] = []
    activity.subscribe(heard.append)
    assert heard == [False]  # the state now, on subscribing
    with activity.running():
        with activity.running():  # a second generation while one runs: no change
            assert activity.busy
        assert heard == [False, True]
    assert heard == [False, True, False] and not activity.busy
    with pytest.raises(RuntimeError), activity.running():
        raise RuntimeError("a generation that fails still ends")
    assert heard == [False, True, False, True, False]


def test_a_failing_listener_fails_no_generation(caplog: pytest.LogCaptureFixture) -> None:
    activity = Activity()
    heard: list[bool] = []

    def broken(busy: bool) -> None:
        raise OSError("gone")

    activity.subscribe(broken)
    activity.subscribe(heard.append)
    with activity.running():
        pass
    assert heard == [False, True, False]  # the others still hear every change
    assert "an LLM activity listener failed" in caplog.text


def test_changes_from_many_threads_end_idle() -> None:
    activity = Activity()
    heard: list[bool] = []
    activity.subscribe(heard.append)

    def generate() -> None:
        for _ in range(200):
            with activity.running():
                pass

    threads = [threading.Thread(target=generate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert heard[-1] is False and not activity.busy
    assert all(a != b for a, b in zip(heard, heard[1:]))  # every change heard, alternating, none twice


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.usefixtures("four_cores")
def test_the_decoder_leaves_the_llm_engine_its_cores_by_default(tmp_path: Path) -> None:
    def beside(**settings: object) -> int | None:
        return decoder_threads_beside_llm(Settings(cache_dir=tmp_path, **settings))  # type: ignore[arg-type]

    assert beside() == 1  # the engine takes all cores but one (3 of 4): one left
    assert beside(decoders={"threads": 8}) == 5
    assert beside(llm={"threads": 2}) == 2
    assert beside(llm={"cpus": "auto", "threads": 2}) == 2  # bound to 2 of the cores
    assert beside(llm={"engine_process": False}) == 1  # decoding in the server: torch's 4 threads there
    assert beside(decoders={"threads_beside_llm": 3}) == 3
    assert beside(decoders={"threads": 1}) is None  # nothing to give up
    # Never switched: asked not to, the pipelines in the server, on a GPU, the LLM elsewhere.
    assert beside(decoders={"threads_beside_llm": 0}) is None
    assert beside(decoders={"engine_process": False}) is None
    assert beside(decoders={"device": "cuda"}) is None
    assert beside(llm={"device": "cuda"}) is None
    assert beside(llm={"url": "http://llm:8002"}) is None


def test_omp_num_threads_sets_every_process_and_nothing_switches(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert decoder_threads_beside_llm(Settings(cache_dir=tmp_path)) is None
