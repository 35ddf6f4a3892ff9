"""The embedded pool's pipelines in a child process (``PipelineProcess``), on the tiny bundle: the same pictures as
in-process, step callbacks that stop a call, a child that dies mid-call, errors that keep their class."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from services.bundle.loader import Bundle, load_bundle
from services.contracts.decoders import DecodeOptions
from services.contracts.errors import ServiceUnavailableError
from services.decoders.pipeline_process import DecoderProcessDied, PipelineProcess
from services.decoders.pipelines import CallTimeLimitError, DecoderPipelines, ResolvedOptions, resolve
from services.decoders.runner import JobCancelled, OutOfMemoryJobError, classify
from tests.support.jobs import decode_job


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir: Path) -> Bundle:
    return load_bundle(tiny_bundle_dir)


@pytest.fixture(scope="module")
def process(bundle: Bundle) -> Iterator[PipelineProcess]:
    proc = PipelineProcess(bundle, ["image"])
    proc.wait_ready()
    yield proc
    proc.close()


def _opts(bundle: Bundle, steps: int) -> ResolvedOptions:
    return resolve(DecodeOptions(steps=steps), bundle.manifest.outputs["image"].decoder.defaults, seed=0)


def _conditioning(bundle: Bundle, count: int) -> torch.Tensor:
    return torch.randn(count, *bundle.manifest.outputs["image"].projector.output_shape,
                       generator=torch.Generator().manual_seed(count))


def _pixels(image: object) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_the_decoder_threads_setting_reaches_the_child(bundle: Bundle, process: PipelineProcess,
                                                      tmp_path: Path) -> None:
    """``decoders.threads`` sets the child's torch threads (a team of one per core slows 3-4x when another process
    keeps a core busy); unset, the child has torch's default, as the serving process has."""
    from services.contracts.settings import Settings
    from services.decoders.compose import build_runner
    from services.jobs.book import MemoryJobBook

    assert process.threads == torch.get_num_threads()
    settings = Settings(cache_dir=tmp_path, decoders={"threads": 1})
    own = build_runner(settings, bundle, ["image"], MemoryJobBook(), own_process=True).pipelines
    assert isinstance(own, PipelineProcess)
    try:
        own.wait_ready()
        assert own.threads == 1
        cond, opts = _conditioning(bundle, 1), _opts(bundle, 2)
        assert len(own.generate_batch("image", cond, [1], opts, lambda *_: None)) == 1
    finally:
        own.close()


def test_the_child_takes_fewer_threads_while_told_the_cpu_is_contended(bundle: Bundle) -> None:
    """``set_contended``: from the next step on, the child runs at ``threads_contended`` (the embedded server says
    so while the LLM generates), and goes back to its own threads ``contended_hold_s`` after it is told the
    contention ended. Each step reports the threads the child takes next."""
    cond, opts = _conditioning(bundle, 1), _opts(bundle, 3)
    own = PipelineProcess(bundle, ["image"], threads=2, threads_contended=1, contended_hold_s=0.0)
    held = PipelineProcess(bundle, ["image"], threads=2, threads_contended=1, contended_hold_s=600.0)

    def threads_per_step(process: PipelineProcess) -> list[int | None]:
        seen: list[int | None] = []
        process.generate_batch("image", cond, [1], opts, lambda *_: seen.append(process.threads))
        return seen

    try:
        own.wait_ready()
        held.wait_ready()
        assert own.threads == 2 and threads_per_step(own) == [2, 2, 2]
        own.set_contended(True)
        assert threads_per_step(own) == [1, 1, 1]
        own.set_contended(False)  # no hold: its own threads again at once
        assert threads_per_step(own) == [2, 2, 2]
        held.set_contended(True)
        held.set_contended(False)  # within the hold: still contended
        assert threads_per_step(held) == [1, 1, 1]
    finally:
        own.close()
        held.close()


def test_the_child_makes_the_pictures_the_pipelines_make_in_process(bundle: Bundle,
                                                                    process: PipelineProcess) -> None:
    cond, opts = _conditioning(bundle, 2), _opts(bundle, 3)
    steps: list[tuple[int, int]] = []
    there = process.generate_batch("image", cond, [5, 6], opts, lambda step, total: steps.append((step, total)))
    here = DecoderPipelines(bundle, ["image"]).generate_batch("image", cond, [5, 6], opts, lambda *_: None)
    assert steps == [(1, 3), (2, 3), (3, 3)]  # every step reported, in order
    assert len(there) == 2 and all(g.modality == "image" for g in there)
    for a, b in zip(there, here, strict=True):
        assert abs(_pixels(a.image) - _pixels(b.image)).max() <= 2
    assert abs(_pixels(there[0].image) - _pixels(there[1].image)).max() > 10  # two seeds, two pictures
    process.check_health()  # loaded: nothing for /readyz to report


def test_a_step_callback_that_raises_stops_the_call_and_the_child_serves_on(bundle: Bundle,
                                                                            process: PipelineProcess) -> None:
    starts, seen = process.starts, []

    def cancel_at_two(step: int, total: int) -> None:
        seen.append(step)
        if step == 2:
            raise JobCancelled

    with pytest.raises(JobCancelled):
        process.generate_batch("image", _conditioning(bundle, 1), [1], _opts(bundle, 50), cancel_at_two)
    assert seen == [1, 2]  # stopped at once, not after the remaining 48 steps
    done = process.generate_batch("image", _conditioning(bundle, 1), [1], _opts(bundle, 2), lambda *_: None)
    assert len(done) == 1 and process.starts == starts  # the same child


def test_an_error_in_the_child_keeps_its_class_and_the_child_lives(bundle: Bundle,
                                                                   process: PipelineProcess) -> None:
    starts = process.starts
    bad = torch.randn(1, 3, 5)  # not the projector's shape: the pipeline itself refuses it
    with pytest.raises(Exception) as caught:
        process.generate_batch("image", bad, [1], _opts(bundle, 2), lambda *_: None)
    assert not isinstance(caught.value, DecoderProcessDied)
    assert type(caught.value).__module__ == "builtins"  # the child's own exception class, not a wrapper
    with pytest.raises(Exception):  # not loaded in this child: a KeyError, as in process
        process.generate_batch("audio", _conditioning(bundle, 1), [1], _opts(bundle, 2), lambda *_: None)
    assert len(process.generate_batch("image", _conditioning(bundle, 1), [1], _opts(bundle, 2),
                                      lambda *_: None)) == 1
    assert process.starts == starts


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_child_that_dies_mid_call_fails_the_call_and_the_next_call_gets_a_new_child(
        bundle: Bundle, process: PipelineProcess, sig: signal.Signals) -> None:
    starts = process.starts

    def die(step: int, total: int) -> None:
        if step == 1:
            os.kill(process._process.pid, sig)

    with pytest.raises(Exception) as caught:
        process.generate_batch("image", _conditioning(bundle, 2), [1, 2], _opts(bundle, 50), die)
    if sig == signal.SIGKILL:  # the OOM killer's signal: the runner retries the jobs as out of memory
        assert isinstance(classify(caught.value, "image"), OutOfMemoryJobError)
    else:
        assert isinstance(caught.value, DecoderProcessDied) and "exit code -11" in str(caught.value)
    done = process.generate_batch("image", _conditioning(bundle, 1), [1], _opts(bundle, 2), lambda *_: None)
    assert len(done) == 1 and process.starts == starts + 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_the_process_group_leaves_the_call_to_the_parent(
        bundle: Bundle, process: PipelineProcess, sig: signal.Signals) -> None:
    """systemd (and a terminal's Ctrl-C) signal every process of the group: the child must not die mid-call, or
    a Celery worker's warm shutdown, which lets its batch end, would fail that batch's jobs instead."""
    starts = process.starts

    def signal_at_one(step: int, total: int) -> None:
        if step == 1:
            os.kill(process._process.pid, sig)

    done = process.generate_batch("image", _conditioning(bundle, 1), [1], _opts(bundle, 4), signal_at_one)
    assert len(done) == 1 and process._process.is_alive() and process.starts == starts


def test_a_step_longer_than_the_time_limit_or_than_a_stop_is_ended_by_killing_the_child(bundle: Bundle) -> None:
    """A step is never interrupted, so a step of many minutes (a size within the pixel budget) would hold the pool
    that long. A child frozen mid-call (SIGSTOP) stands for it: past the call's time limit plus the grace with no
    step, or the grace after a stop (a cancel), the child is killed and the call ends; the next call gets a new
    child."""
    proc = PipelineProcess(bundle, ["image"], call_limit_s=60.0, stop_grace_s=0.5)
    try:
        # A first call holds the child's warm-up, which a busy machine can stretch past 1 s.
        proc.generate_batch("image", _conditioning(bundle, 1), [1], _opts(bundle, 2), lambda *_: None)
        proc.call_limit_s = 1.0
        starts = proc.starts

        def freeze(step: int, total: int) -> None:
            if step == 1:
                os.kill(proc._process.pid, signal.SIGSTOP)

        started = time.monotonic()
        with pytest.raises(CallTimeLimitError, match="ran past the time limit of 1 s"):
            proc.generate_batch("image", _conditioning(bundle, 1), [1], _opts(bundle, 50), freeze)
        assert time.monotonic() - started < 1.0 + 0.5 + 2.0
        proc.call_limit_s = 60.0  # the new child's first call holds its warm-up: 1 s is for the frozen call only
        assert len(proc.generate_batch("image", _conditioning(bundle, 1), [1], _opts(bundle, 2),
                                       lambda *_: None)) == 1
        assert proc.starts == starts + 1

        def freeze_and_cancel(step: int, total: int) -> None:
            if step == 1:
                os.kill(proc._process.pid, signal.SIGSTOP)
                raise JobCancelled

        proc.call_limit_s = None  # only the stop's grace ends it now
        started = time.monotonic()
        with pytest.raises(JobCancelled):
            proc.generate_batch("image", _conditioning(bundle, 1), [1], _opts(bundle, 50), freeze_and_cancel)
        assert time.monotonic() - started < 0.5 + 2.0
        assert len(proc.generate_batch("image", _conditioning(bundle, 1), [1], _opts(bundle, 2),
                                       lambda *_: None)) == 1
        assert proc.starts == starts + 2
    finally:
        proc.close()


def test_a_bundle_the_child_cannot_load_fails_at_start_up(bundle: Bundle, tmp_path: Path) -> None:
    proc = PipelineProcess(replace(bundle, root=tmp_path / "missing"), ["image"])
    try:
        with pytest.raises(RuntimeError, match="failed to load its pipelines"):
            proc.wait_ready()
        with pytest.raises(ServiceUnavailableError, match="failed to load") as caught:  # /readyz: degraded
            proc.check_health()
        assert caught.value.code == "decoders_unavailable"
    finally:
        proc.close()


def test_closing_stops_a_call_in_flight_at_its_next_step_and_ends_the_child(bundle: Bundle) -> None:
    import threading

    proc = PipelineProcess(bundle, ["image"])
    steps: list[int] = []
    closer = threading.Thread(target=proc.close)

    def close_at_one(step: int, total: int) -> None:
        steps.append(step)
        if step == 1:
            closer.start()  # as the server's shutdown does, from another thread

    with pytest.raises(RuntimeError, match="shutting down"):
        proc.generate_batch("image", _conditioning(bundle, 1), [1], _opts(bundle, 200), close_at_one)
    closer.join(30)
    assert not closer.is_alive() and not proc._process.is_alive()
    assert len(steps) < 50  # stopped, not run to its 200th step
    with pytest.raises(RuntimeError, match="closed"):
        proc.generate_batch("image", _conditioning(bundle, 1), [1], _opts(bundle, 2), lambda *_: None)


async def test_the_embedded_pool_on_the_child_cancels_a_whole_batch_and_goes_on(
        bundle: Bundle, process: PipelineProcess, tmp_path: Path) -> None:
    import asyncio

    from services.contracts.decoders import DecodeJob
    from services.decoders.local_queue import LocalDecoderQueue
    from services.decoders.runner import DecoderRunner
    from services.jobs.book import MemoryJobBook
    from services.storage.local import LocalArtifactStore

    store, book = LocalArtifactStore(tmp_path, 10**8), MemoryJobBook()
    queue = LocalDecoderQueue(DecoderRunner(process, store, book, bundle.manifest, time_limit_s=60), book,
                              max_batch=4)

    def job(steps: int, seed: int) -> DecodeJob:
        return decode_job(store, _conditioning(bundle, 1)[0], steps=steps, seed=seed)

    async def events(job_id: str) -> list:
        return await asyncio.wait_for(_collect(queue, job_id), 60)

    starts = process.starts
    try:
        batch = [job(200, 1), job(200, 2)]
        for item in batch:
            await queue.submit(item)
        async for event in queue.events(batch[0].job_id):
            if event.type == "progress":
                for item in batch:
                    await queue.cancel(item.job_id)
                break
        for item in batch:
            seen = await events(item.job_id)
            assert seen[-1].type == "cancelled" and len([e for e in seen if e.type == "progress"]) < 100
        after = job(3, 3)
        await queue.submit(after)
        seen = await events(after.job_id)
        assert [e.type for e in seen] == ["queued", "started", "progress", "progress", "progress", "completed"]
        assert process.starts == starts  # the stopped call left the same child ready
    finally:
        queue.close()


async def _collect(queue: object, job_id: str) -> list:
    return [e async for e in queue.events(job_id)]  # type: ignore[attr-defined]


def test_a_batch_whose_step_outran_the_limit_fails_as_timed_out_without_running_again(bundle: Bundle,
                                                                                      tmp_path: Path) -> None:
    """The runner over a child with a 1 s call limit: the child freezes mid-batch (a step that does not end);
    both jobs fail as timed out at once, and are not run again one by one (alone, each would take as long)."""
    import threading

    from services.decoders.runner import DecoderRunner, JobTimeoutError
    from services.jobs.book import MemoryJobBook
    from services.storage.local import LocalArtifactStore

    store, book = LocalArtifactStore(tmp_path, 10**8), MemoryJobBook()
    proc = PipelineProcess(bundle, ["image"], call_limit_s=60.0, stop_grace_s=0.5)
    try:
        # A first call holds the child's warm-up, which a busy machine can stretch past 1 s.
        proc.generate_batch("image", _conditioning(bundle, 2), [1, 2], _opts(bundle, 2), lambda *_: None)
        proc.call_limit_s = 1.0
        # The runner's own limit out of reach, so that its pace check (which would end the frozen call first, as
        # too slow, and run its jobs again alone) leaves this call to the child's call limit.
        runner = DecoderRunner(proc, store, book, bundle.manifest, time_limit_s=10**6)
        jobs = [decode_job(store, _conditioning(bundle, 1)[0], steps=200, seed=i) for i in range(2)]

        def freeze_after_a_step() -> None:
            deadline = time.monotonic() + 30
            while not any(e.type == "progress" for e in book.events(jobs[0].job_id)) and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(proc._process.pid, signal.SIGSTOP)

        freezer = threading.Thread(target=freeze_after_a_step)
        freezer.start()
        starts, started = proc.starts, time.monotonic()
        outcomes = runner.run_batch(jobs)
        freezer.join()
        assert all(isinstance(o, JobTimeoutError) and "ran past the time limit of 1 s" in str(o) for o in outcomes)
        # Not run again one by one: the new child (not frozen) would have made them.
        assert time.monotonic() - started < 1.0 + 0.5 + 3.0 and proc.starts == starts + 1
        proc.call_limit_s = 60.0  # the new child's first call holds its warm-up
        assert runner.run(decode_job(store, _conditioning(bundle, 1)[0], steps=2)) is not None
        assert proc.starts == starts + 1  # the child started at the kill serves
    finally:
        proc.close()


def test_a_job_cancelled_while_its_step_runs_ends_within_the_poll_and_the_grace(bundle: Bundle,
                                                                             tmp_path: Path) -> None:
    """A cancel used to be seen only when a step ended: with a step of minutes (a CPU near the pixel budget), the
    job went on that long after its cancel. The runner's check now runs every second while a step runs; a child
    frozen mid-step (SIGSTOP) stands for the long step, with no call limit to end it otherwise."""
    import threading

    from services.decoders.runner import DecoderRunner
    from services.jobs.book import MemoryJobBook
    from services.storage.local import LocalArtifactStore

    store, book = LocalArtifactStore(tmp_path, 10**8), MemoryJobBook()
    proc = PipelineProcess(bundle, ["image"], call_limit_s=None, stop_grace_s=0.5)
    try:
        proc.wait_ready()
        runner = DecoderRunner(proc, store, book, bundle.manifest, time_limit_s=600)
        job = decode_job(store, _conditioning(bundle, 1)[0], steps=200, seed=1)
        cancelled_at: list[float] = []

        def freeze_then_cancel() -> None:
            deadline = time.monotonic() + 30
            while not any(e.type == "progress" for e in book.events(job.job_id)) and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(proc._process.pid, signal.SIGSTOP)
            time.sleep(0.5)  # well inside the step that now never ends
            book.cancel(job.job_id)
            cancelled_at.append(time.monotonic())

        canceller = threading.Thread(target=freeze_then_cancel)
        canceller.start()
        starts = proc.starts
        outcome = runner.run_batch([job])[0]
        canceller.join()
        assert outcome is None  # cancelled
        assert book.events(job.job_id)[-1].type == "cancelled"
        assert time.monotonic() - cancelled_at[0] < 1.0 + 0.5 + 2.0  # the poll, the grace, and some slack
        assert proc.starts == starts + 1  # the frozen child was killed; a new one serves
        assert runner.run(decode_job(store, _conditioning(bundle, 1)[0], steps=2)) is not None
    finally:
        proc.close()


def test_a_step_that_already_shows_the_call_too_slow_ends_it_before_the_step_does(bundle: Bundle,
                                                                               tmp_path: Path) -> None:
    """The pace check used to run only when a step ended: a step of minutes (a CPU near the pixel budget) was
    waited out first, and one past the time limit until the limit. While a step runs, the step as if it ended
    now is the least the call takes: with a 20 s limit and 25 steps, a first step still running after 1.6 s
    (2 x 20 / 25) already shows a call of more than twice the limit. A frozen child (SIGSTOP) is that step."""
    import threading

    from services.decoders.runner import DecoderRunner, JobTimeoutError
    from services.jobs.book import MemoryJobBook
    from services.storage.local import LocalArtifactStore

    store, book = LocalArtifactStore(tmp_path, 10**8), MemoryJobBook()
    proc = PipelineProcess(bundle, ["image"], call_limit_s=20.0, stop_grace_s=0.5)
    try:
        proc.wait_ready()
        runner = DecoderRunner(proc, store, book, bundle.manifest, time_limit_s=20.0)
        job = decode_job(store, _conditioning(bundle, 1)[0], steps=25, seed=1)

        def freeze_once_started() -> None:
            deadline = time.monotonic() + 30
            while not any(e.type == "started" for e in book.events(job.job_id)) and time.monotonic() < deadline:
                time.sleep(0.005)
            os.kill(proc._process.pid, signal.SIGSTOP)

        freezer = threading.Thread(target=freeze_once_started)
        freezer.start()
        starts, started = proc.starts, time.monotonic()
        outcome = runner.run_batch([job])[0]
        freezer.join()
        assert isinstance(outcome, JobTimeoutError) and "would run past its time limit of 20 s" in str(outcome)
        assert time.monotonic() - started < 8.0  # not the 20.5 s at which the limit alone would have killed it
        assert proc.starts == starts + 1
    finally:
        proc.close()
