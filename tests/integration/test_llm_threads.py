"""``llm.threads``: the transformers backend decodes on that many torch threads, in its engine process or in the
server's own process; by default its engine process leaves the server one core. ``llm.cpus``: the CPUs its engine
process is bound to."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from services.bundle.loader import load_bundle
from services.contracts.errors import ConfigurationError
from services.contracts.settings import LLMSettings
from services.llm.compose import build_llm_service
from services.llm.engine_process import EngineProcess


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _engine(bundle: Path, settings: LLMSettings) -> tuple[int, list[int]]:
    """The threads and CPUs the engine process reports at start, and the CPUs the kernel has for it."""
    service = build_llm_service(load_bundle(bundle), settings, CollectorRegistry())
    try:
        assert isinstance(service.backend, EngineProcess)
        pid = service.backend._process.pid
        assert pid is not None
        assert sorted(os.sched_getaffinity(pid)) == service.backend.cpus  # the process, not only its report
        return service.backend.threads, service.backend.cpus
    finally:
        service.close()


@pytest.mark.parametrize("threads", [1, 3])
def test_the_engine_process_runs_on_the_threads_set(tiny_bundle_dir: Path, threads: int) -> None:
    assert _engine(tiny_bundle_dir, LLMSettings(threads=threads, max_batch=2))[0] == threads


def test_by_default_the_engine_leaves_the_server_a_core(tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU the engine takes all of torch's default threads but one (one at least)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    expected = max(1, torch.get_num_threads() - 1)
    assert _engine(tiny_bundle_dir, LLMSettings(max_batch=2)) == (expected, sorted(os.sched_getaffinity(0)))  # unbound


def test_omp_num_threads_decides_when_set(tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the engine process inherits it, and torch reads it (up to the cores)
    assert _engine(tiny_bundle_dir, LLMSettings(max_batch=2))[0] == min(2, os.cpu_count() or 1)


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



def test_the_engine_process_is_bound_to_the_cpus_set(tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    allowed = sorted(os.sched_getaffinity(0))
    # A list: those CPUs, and as many torch threads as CPUs (the default would leave one out)...
    assert _engine(tiny_bundle_dir, LLMSettings(cpus=",".join(map(str, allowed)), max_batch=2)) == \
        (len(allowed), allowed)
    # ... unless threads says otherwise.
    assert _engine(tiny_bundle_dir, LLMSettings(cpus=str(allowed[-1]), threads=2, max_batch=2)) == (2, allowed[-1:])


def test_auto_binds_the_engine_to_the_last_cpus_leaving_the_first_to_the_server(
        tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    allowed = sorted(os.sched_getaffinity(0))
    threads, cpus = _engine(tiny_bundle_dir, LLMSettings(cpus="auto", max_batch=2))
    if len(allowed) == 1:  # nothing to leave: unbound
        assert cpus == allowed
    else:
        assert threads == max(1, torch.get_num_threads() - 1) and cpus == allowed[-threads:]
        assert allowed[0] not in cpus


@pytest.mark.parametrize("cpus", ["4096", "1-0"])
def test_cpus_this_server_cannot_use_or_backward_ranges_are_refused(tiny_bundle_dir: Path, cpus: str) -> None:
    with pytest.raises(ConfigurationError, match="NEXTGPT_LLM__CPUS"):
        build_llm_service(load_bundle(tiny_bundle_dir), LLMSettings(cpus=cpus, max_batch=2), CollectorRegistry())


@pytest.mark.parametrize("settings", [{"cpus": "1;2"}, {"cpus": ""}, {"cpus": "1", "engine_process": False},
                                      {"cpus": "auto", "backend": "vllm", "vllm_url": "http://x",
                                       "vllm_pooler_url": "http://y"}])
def test_cpus_are_a_list_or_auto_for_the_engine_process(settings: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="cpus|CPUS"):
        LLMSettings(**settings)  # type: ignore[arg-type]
