"""The embedded DecoderQueue: same contract as the Celery one, in one process, on the tiny bundle."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry

from services.bundle.loader import load_bundle
from services.contracts.bundle_manifest import Modality
from services.contracts.decoders import DecodeJob, JobEvent
from services.contracts.errors import ServiceUnavailableError
from services.contracts.storage import new_key
from services.decoders.local_queue import LocalDecoderQueue
from services.decoders.metrics import DecoderMetrics
from services.decoders.pipelines import DecoderPipelines
from services.decoders.runner import DecoderRunner
from services.jobs.book import MemoryJobBook
from services.storage.local import LocalArtifactStore
from tests.support.jobs import decode_job


@pytest.fixture(scope="module")
def pipelines(tiny_bundle_dir: Path) -> DecoderPipelines:
    return DecoderPipelines(load_bundle(tiny_bundle_dir), ["image", "audio"])


@pytest.fixture()
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts", 10**8)


@pytest.fixture()
def queue(pipelines: DecoderPipelines, store: LocalArtifactStore) -> Iterator[LocalDecoderQueue]:
    book = MemoryJobBook()
    q = LocalDecoderQueue(DecoderRunner(pipelines, store, book, pipelines.bundle.manifest, time_limit_s=60),
                          book, max_queued=3)
    yield q
    q.close()


def _job(store: LocalArtifactStore, shape: tuple[int, ...], modality: Modality = "image", **opts: object) -> DecodeJob:
    return decode_job(store, torch.randn(*shape), modality, **opts)


async def _events(queue: LocalDecoderQueue, job_id: str) -> list[JobEvent]:
    return await asyncio.wait_for(_all(queue, job_id), 60)


async def _all(queue: LocalDecoderQueue, job_id: str) -> list[JobEvent]:
    return [e async for e in queue.events(job_id)]


async def test_image_job(queue: LocalDecoderQueue, store: LocalArtifactStore) -> None:
    job = _job(store, (77, 32), steps=2, seed=5)
    await queue.submit(job)
    events = await _events(queue, job.job_id)
    assert [e.type for e in events] == ["queued", "started", "progress", "progress", "completed"]
    assert Image.open(io.BytesIO(store.read(job.artifact_key))).size == (64, 64)
    status = await queue.status(job.job_id)
    assert status is not None and status.state == "completed" and status.step == 2
    assert status.artifact is not None and status.artifact.metadata["seed"] == "5"


async def test_same_seed_same_image_and_redelivery_writes_nothing_new(
        queue: LocalDecoderQueue, store: LocalArtifactStore) -> None:
    job = _job(store, (77, 32), steps=2, seed=9)
    await queue.submit(job)
    await _events(queue, job.job_id)
    first = store.read(job.artifact_key)
    info = queue.runner.run(job)  # a second delivery of the same job
    assert info is not None and info.key == job.artifact_key and store.read(job.artifact_key) == first


async def test_poison_job_and_bounded_queue(queue: LocalDecoderQueue, store: LocalArtifactStore) -> None:
    bad = _job(store, (3, 3))
    await queue.submit(bad)
    events = await _events(queue, bad.job_id)
    assert events[-1].type == "failed" and "needs [77, 32]" in (events[-1].error or "")
    long_jobs = [_job(store, (77, 32), steps=50) for _ in range(3)]
    for job in long_jobs:
        await queue.submit(job)
    with pytest.raises(ServiceUnavailableError):
        await queue.submit(_job(store, (77, 32)))
    for job in long_jobs:
        await queue.cancel(job.job_id)
    for job in long_jobs:
        assert (await _events(queue, job.job_id))[-1].type == "cancelled"


async def test_audio_job(pipelines: DecoderPipelines, queue: LocalDecoderQueue, store: LocalArtifactStore) -> None:
    import soundfile

    job = _job(store, (24,), modality="audio", steps=2, seconds=0.5)
    await queue.submit(job)
    assert (await _events(queue, job.job_id))[-1].type == "completed"
    samples, rate = soundfile.read(io.BytesIO(store.read(job.artifact_key)))
    assert rate == 16000 and len(samples) == 8000


async def test_a_job_over_the_pixel_budget_fails_before_decoding(pipelines: DecoderPipelines,
                                                                 store: LocalArtifactStore) -> None:
    book = MemoryJobBook()
    queue = LocalDecoderQueue(DecoderRunner(pipelines, store, book, pipelines.bundle.manifest, time_limit_s=60,
                                            max_pixels=64 * 64), book)
    try:
        shape = tuple(pipelines.bundle.manifest.outputs["image"].projector.output_shape)
        big = _job(store, shape, steps=2, height=128, width=64)  # 8192 pixels > 4096
        await queue.submit(big)
        events = await _events(queue, big.job_id)
        assert [e.type for e in events][-1] == "failed" and "exceeds the budget of 4096 pixels" in str(events[-1].error)
        assert "progress" not in [e.type for e in events]
        ok = _job(store, shape, steps=2)  # the bundle's 64x64 default fits
        await queue.submit(ok)
        assert (await _events(queue, ok.job_id))[-1].type == "completed"
    finally:
        queue.close()


def _eventually(check: Callable[[], bool], show: Callable[[], object] = lambda: None, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, show()
        time.sleep(0.05)


def _pixels(data: bytes) -> "np.ndarray":
    import numpy as np

    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


async def test_queued_jobs_of_one_shape_run_as_one_batch_each_as_if_alone(
        pipelines: DecoderPipelines, store: LocalArtifactStore) -> None:
    book, registry = MemoryJobBook(), CollectorRegistry()
    runner = DecoderRunner(pipelines, store, book, pipelines.bundle.manifest, time_limit_s=60,
                           metrics=DecoderMetrics(registry))
    queue = LocalDecoderQueue(runner, book, max_batch=4)
    try:
        blocker = _job(store, (77, 32), steps=8, seed=1)
        batch = [_job(store, (77, 32), steps=3, seed=10 + i) for i in range(4)]
        other = _job(store, (77, 32), steps=4, seed=20)  # other steps: not in the batch
        for job in [blocker, *batch, other]:
            await queue.submit(job)
        for job in batch:
            events = await _events(queue, job.job_id)
            assert [e.type for e in events] == ["queued", "started", "progress", "progress", "progress", "completed"]
            assert events[-1].artifact is not None and events[-1].artifact.metadata["batch"] == "4"
        assert (await _events(queue, other.job_id))[-1].artifact.metadata["batch"] == "1"  # type: ignore[union-attr]
        # /metrics: three pipeline calls (the blocker alone, the four together, the other alone), six jobs done.
        # A job's outcome is counted when its batch returns, just after its last event.
        sample = registry.get_sample_value
        _eventually(lambda: sample("nextgpt_decoder_jobs_total", {"modality": "image", "outcome": "completed"}) == 6)
        assert sample("nextgpt_decoder_batch_size_count", {"modality": "image"}) == 3
        assert sample("nextgpt_decoder_batch_size_sum", {"modality": "image"}) == 6
        assert sample("nextgpt_decoder_batch_size_bucket", {"modality": "image", "le": "2.0"}) == 2
        assert sample("nextgpt_decoder_jobs_total", {"modality": "image", "outcome": "completed"}) == 6
        assert sample("nextgpt_decoder_call_seconds_count", {"modality": "image"}) == 3
        for job in batch:  # the same job alone: the same picture (up to float rounding of the batched kernels)
            alone = job.model_copy(update={"artifact_key": new_key("image", ".png")})
            assert runner.run(alone) is not None
            assert abs(_pixels(store.read(alone.artifact_key)) - _pixels(store.read(job.artifact_key))).max() <= 2
    finally:
        queue.close()


class _BreaksWithSeed(DecoderPipelines):
    """The real pipelines, except that a call with seed 666 in it fails (a job that breaks whatever call it is in)."""

    def __init__(self, real: DecoderPipelines) -> None:
        self.__dict__.update(real.__dict__)

    def generate_batch(self, modality, conditioning, seeds, opts, on_step, check=None):  # type: ignore[no-untyped-def]
        if 666 in seeds:
            raise RuntimeError("this job breaks the call")
        return super().generate_batch(modality, conditioning, seeds, opts, on_step, check)


async def test_one_bad_job_does_not_fail_its_batch_mates(pipelines: DecoderPipelines,
                                                         store: LocalArtifactStore) -> None:
    book, registry = MemoryJobBook(), CollectorRegistry()
    queue = LocalDecoderQueue(DecoderRunner(_BreaksWithSeed(pipelines), store, book, pipelines.bundle.manifest,
                                            time_limit_s=60, metrics=DecoderMetrics(registry)), book, max_batch=8)
    try:
        blocker = _job(store, (77, 32), steps=6, seed=1)
        bad_shape = _job(store, (3, 3), steps=2, seed=2)
        breaker = _job(store, (77, 32), steps=2, seed=666)
        good = [_job(store, (77, 32), steps=2, seed=30 + i) for i in range(3)]
        cancelled = _job(store, (77, 32), steps=2, seed=40)
        for job in [blocker, bad_shape, breaker, *good, cancelled]:
            await queue.submit(job)
        await queue.cancel(cancelled.job_id)
        assert (await _events(queue, bad_shape.job_id))[-1].type == "failed"
        failed = (await _events(queue, breaker.job_id))[-1]
        assert failed.type == "failed" and "breaks the call" in (failed.error or "")
        for job in good:
            assert (await _events(queue, job.job_id))[-1].type == "completed"
        assert (await _events(queue, cancelled.job_id))[-1].type == "cancelled"
        def outcomes() -> dict[str, float | None]:
            return {outcome: registry.get_sample_value("nextgpt_decoder_jobs_total",
                                                       {"modality": "image", "outcome": outcome})
                    for outcome in ("completed", "failed", "cancelled")}

        _eventually(lambda: outcomes() == {"completed": 4, "failed": 2, "cancelled": 1}, outcomes)
    finally:
        queue.close()


async def test_a_job_cancelled_inside_a_batch_ends_at_once_and_the_others_finish(
        pipelines: DecoderPipelines, store: LocalArtifactStore) -> None:
    book = MemoryJobBook()
    queue = LocalDecoderQueue(DecoderRunner(pipelines, store, book, pipelines.bundle.manifest, time_limit_s=60),
                              book, max_batch=4)
    try:
        blocker = _job(store, (77, 32), steps=4, seed=1)
        jobs = [_job(store, (77, 32), steps=30, seed=50 + i) for i in range(3)]
        for job in [blocker, *jobs]:
            await queue.submit(job)
        async for event in queue.events(jobs[0].job_id):
            if event.type == "progress":
                await queue.cancel(jobs[0].job_id)
                break
        events = await _events(queue, jobs[0].job_id)
        assert events[-1].type == "cancelled" and len([e for e in events if e.type == "progress"]) < 30
        for job in jobs[1:]:
            done = (await _events(queue, job.job_id))[-1]
            assert done.type == "completed" and done.artifact is not None and done.artifact.metadata["batch"] == "3"
    finally:
        queue.close()


async def test_a_batch_stays_within_one_jobs_pixel_budget(pipelines: DecoderPipelines,
                                                          store: LocalArtifactStore) -> None:
    book = MemoryJobBook()
    runner = DecoderRunner(pipelines, store, book, pipelines.bundle.manifest, time_limit_s=60,
                           max_pixels=64 * 64 * 2)  # room for two 64x64 pictures at once
    queue = LocalDecoderQueue(runner, book, max_batch=8)
    try:
        blocker = _job(store, (77, 32), steps=6, seed=1)
        jobs = [_job(store, (77, 32), steps=2, seed=60 + i) for i in range(4)]
        for job in [blocker, *jobs]:
            await queue.submit(job)
        sizes = [(await _events(queue, job.job_id))[-1].artifact.metadata["batch"] for job in jobs]  # type: ignore[union-attr]
        assert sizes == ["2", "2", "2", "2"]
    finally:
        queue.close()


class _BrokenDevice(DecoderPipelines):
    def __init__(self, real: DecoderPipelines) -> None:
        self.__dict__.update(real.__dict__)

    def generate_batch(self, modality, conditioning, seeds, opts, on_step, check=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA error: device-side assert triggered")


async def test_a_broken_device_fails_the_job_and_stops_the_server(pipelines: DecoderPipelines,
                                                                  store: LocalArtifactStore,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    signals: list[tuple[int, int]] = []
    # The server's own SIGTERM (a graceful stop, so its supervisor starts a fresh process) is recorded, not sent.
    monkeypatch.setattr("services.decoders.local_queue.os.kill", lambda pid, sig: signals.append((pid, sig)))
    book = MemoryJobBook()
    queue = LocalDecoderQueue(DecoderRunner(_BrokenDevice(pipelines), store, book, pipelines.bundle.manifest), book)
    try:
        job = _job(store, (77, 32), steps=2)
        await queue.submit(job)
        failed = (await _events(queue, job.job_id))[-1]
        assert failed.type == "failed" and "broke the device" in (failed.error or "")
        for _ in range(50):  # the worker thread signals right after failing the job
            if signals:
                break
            await asyncio.sleep(0.1)
        assert signals == [(os.getpid(), signal.SIGTERM)]
    finally:
        queue.close()


async def test_jobs_sent_moments_apart_to_an_idle_pool_wait_for_each_other(pipelines: DecoderPipelines,
                                                                            store: LocalArtifactStore) -> None:
    book = MemoryJobBook()
    runner = DecoderRunner(pipelines, store, book, pipelines.bundle.manifest, time_limit_s=60)
    queue = LocalDecoderQueue(runner, book, max_batch=3, batch_wait_s=1.0)
    try:
        jobs = [_job(store, (77, 32), steps=2, seed=80 + i) for i in range(3)]
        for job in jobs:  # as a turn's jobs (or several users') arrive: not in one instant
            await queue.submit(job)
            await asyncio.sleep(0.05)
        sizes = [(await _events(queue, job.job_id))[-1].artifact.metadata["batch"] for job in jobs]  # type: ignore[union-attr]
        assert sizes == ["3", "3", "3"]
    finally:
        queue.close()


def test_a_job_whose_pace_cannot_meet_the_time_limit_ends_within_a_few_steps(pipelines: DecoderPipelines,
                                                                             store: LocalArtifactStore) -> None:
    """The pixel budget bounds memory, not time: a size within it may take hours on a CPU. Such a job ends as soon
    as its steps show it cannot end within the time limit, not at the limit, alone or in a batch; a job that fits
    runs as before."""
    book = MemoryJobBook()
    probe = DecoderRunner(pipelines, store, book, pipelines.bundle.manifest, time_limit_s=60)
    probe.run(_job(store, (77, 32), steps=2, height=128, width=128))  # warm
    started = time.perf_counter()
    probe.run(_job(store, (77, 32), steps=8, height=128, width=128))
    per_step = (time.perf_counter() - started) / 8
    # 200 steps would take 8x the limit; 8 take a third of it.
    runner = DecoderRunner(pipelines, store, book, pipelines.bundle.manifest, time_limit_s=per_step * 24)
    slow = [_job(store, (77, 32), steps=200, height=128, width=128, seed=i) for i in range(3)]
    started = time.perf_counter()
    outcomes = runner.run_batch(slow)
    took = time.perf_counter() - started
    assert all("would run past its time limit" in str(o) for o in outcomes), outcomes
    for job in slow:  # each ran alone once the batch was found too slow, and ended within a few steps
        assert len([e for e in book.events(job.job_id) if e.type == "progress"]) <= 5
    assert took < runner.time_limit_s * 2
    fits = runner.run(_job(store, (77, 32), steps=8, height=128, width=128))
    assert fits is not None and fits.metadata["steps"] == "8"


async def test_a_follower_sees_the_end_of_a_job_with_more_events_than_the_book_keeps(
        queue: LocalDecoderQueue) -> None:
    """The book keeps a job's last MAX_EVENTS events (a job retried many times over many steps publishes more). A
    follower that had read them all still sees the ones that come after the oldest were dropped, its end included."""
    from services.contracts.job_keys import MAX_EVENTS

    book, job_id = queue.book, "f" * 32
    book.publish(JobEvent(job_id=job_id, type="queued"), "image")
    book.publish(JobEvent(job_id=job_id, type="started"), "image")
    for step in range(MAX_EVENTS - 2):
        book.publish(JobEvent(job_id=job_id, type="progress", step=step % 200 + 1, total=200))
    follower = queue.events(job_id)
    seen = [await anext(follower) for _ in range(MAX_EVENTS)]  # every event so far
    assert seen[0].type == "queued" and len(book.events(job_id)) == MAX_EVENTS
    book.publish(JobEvent(job_id=job_id, type="progress", step=200, total=200))
    book.publish(JobEvent(job_id=job_id, type="completed"), "image")
    rest = await asyncio.wait_for(_all_of(follower), 10)
    assert [e.type for e in rest] == ["progress", "completed"]


async def _all_of(events: object) -> list[JobEvent]:
    return [e async for e in events]  # type: ignore[attr-defined]
