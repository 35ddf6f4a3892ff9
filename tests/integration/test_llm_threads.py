"""``llm.threads``: the transformers backend decodes on that many torch threads, in its engine process or in the
server's own process; by default its engine process leaves the server one core."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from services.bundle.loader import load_bundle
from services.contracts.settings import LLMSettings
from services.llm.compose import build_llm_service
from services.llm.engine_process import EngineProcess


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _engine_threads(bundle: Path, settings: LLMSettings) -> int:
    """The threads the engine process reports at start."""
    service = build_llm_service(load_bundle(bundle), settings, CollectorRegistry())
    try:
        assert isinstance(service.backend, EngineProcess)
        return service.backend.threads
    finally:
        service.close()


@pytest.mark.parametrize("threads", [1, 3])
def test_the_engine_process_runs_on_the_threads_set(tiny_bundle_dir: Path, threads: int) -> None:
    assert _engine_threads(tiny_bundle_dir, LLMSettings(threads=threads, max_batch=2)) == threads


def test_by_default_the_engine_leaves_the_server_a_core(tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU the engine takes all of torch's default threads but one (one at least)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    expected = max(1, torch.get_num_threads() - 1)
    assert _engine_threads(tiny_bundle_dir, LLMSettings(max_batch=2)) == expected


def test_omp_num_threads_decides_when_set(tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the engine process inherits it, and torch reads it (up to the cores)
    assert _engine_threads(tiny_bundle_dir, LLMSettings(max_batch=2)) == min(2, os.cpu_count() or 1)


def test_in_the_server_process_the_setting_is_the_process_threads(tiny_bundle_dir: Path,
                                                                   restore_threads: None) -> None:
    torch.set_num_threads(2)
    service = build_llm_service(load_bundle(tiny_bundle_dir),
                                LLMSettings(threads=1, engine_process=False, max_batch=2), CollectorRegistry())
    try:
        assert torch.get_num_threads() == 1
    finally:
        service.close()


def test_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threads"):
        LLMSettings(threads=0)
