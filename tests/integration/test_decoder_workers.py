"""Decoder jobs through real Redis, a real ``celery worker`` process and a real S3 server, on the tiny bundle."""

from __future__ import annotations

import asyncio
import contextlib
import os
import io
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import av
import httpx
import psutil
import pytest
import redis
import redis.asyncio
import soundfile
import torch
from PIL import Image

from services.bundle.loader import load_bundle
from services.clients.decoder_celery import CeleryDecoderQueue, make_client_app
from services.contracts.bundle_manifest import Modality
from services.contracts.decoders import DecodeJob, JobEvent
from services.contracts.settings import Settings, StorageSettings
from services.contracts.errors import ServiceUnavailableError
from services.jobs.book import RedisJobBook, fail_unclaimed
from services.jobs.reader import AsyncJobReader
from services.storage.s3 import S3ArtifactStore
from tests.support.metrics import samples as metric_samples
from tests.support.jobs import decode_job
from tests.support.servers import RedisInfo, S3Info, free_port
from tests.support.workers import WorkerProcess


@pytest.fixture(scope="module")
def env(redis_info: RedisInfo, s3_info: S3Info, tiny_bundle_dir: Path) -> dict[str, str]:
    bucket = f"dec-{uuid.uuid4().hex[:10]}"
    S3ArtifactStore.from_settings(_storage(s3_info, bucket, create=True))
    return {
        "NEXTGPT_BUNDLE": str(tiny_bundle_dir),
        "NEXTGPT_REDIS__URL": redis_info.url,
        "NEXTGPT_REDIS__KEY_PREFIX": f"{redis_info.key_prefix}{uuid.uuid4().hex[:6]}:",
        "NEXTGPT_STORAGE__BACKEND": "s3",
        "NEXTGPT_STORAGE__S3_ENDPOINT_URL": s3_info.endpoint_url,
        "NEXTGPT_STORAGE__S3_BUCKET": bucket,
        "NEXTGPT_STORAGE__S3_ACCESS_KEY_ID": s3_info.access_key,
        "NEXTGPT_STORAGE__S3_SECRET_ACCESS_KEY": s3_info.secret_key,
        "NEXTGPT_DECODERS__VISIBILITY_TIMEOUT_S": "4",
        "NEXTGPT_DECODERS__LOCK_TTL_S": "4",
        "NEXTGPT_LOG_LEVEL": "info",
    }


def _storage(s3: S3Info, bucket: str, create: bool = False) -> StorageSettings:
    return StorageSettings(backend="s3", s3_endpoint_url=s3.endpoint_url, s3_bucket=bucket,
                           s3_access_key_id=s3.access_key, s3_secret_access_key=s3.secret_key, s3_create_bucket=create)


@pytest.fixture(scope="module")
def settings(env: dict[str, str], monkeypatch_module: pytest.MonkeyPatch) -> Settings:
    for name, value in env.items():
        monkeypatch_module.setenv(name, value)
    return Settings()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(scope="module")
def store(settings: Settings) -> S3ArtifactStore:
    return S3ArtifactStore.from_settings(settings.storage)


@pytest.fixture(scope="module")
def worker(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    port = free_port()
    metrics = {"NEXTGPT_DECODERS__METRICS_PORT": str(port), "NEXTGPT_DECODERS__METRICS_HOST": "127.0.0.1"}
    proc = WorkerProcess("image,video,audio", {**env, **metrics},
                         tmp_path_factory.mktemp("logs") / "all.log").wait_ready()
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
    yield proc
    proc.stop()


@pytest.fixture()
async def queue(settings: Settings) -> AsyncIterator[CeleryDecoderQueue]:
    areader = redis.asyncio.Redis.from_url(settings.redis.url)
    yield CeleryDecoderQueue(make_client_app(settings),
                             RedisJobBook(redis.Redis.from_url(settings.redis.url), settings.redis.key_prefix),
                             AsyncJobReader(areader, settings.redis.key_prefix, block_ms=500))
    await areader.aclose()


def _job(store: S3ArtifactStore, bundle_dir: Path, modality: Modality, shape: tuple[int, ...] | None = None,
         **options: object) -> DecodeJob:
    manifest = load_bundle(bundle_dir).manifest
    shape = shape or manifest.outputs[modality].projector.output_shape
    torch.manual_seed(0)
    return decode_job(store, torch.randn(*shape), modality, **options)


async def _collect(queue: CeleryDecoderQueue, job_id: str, timeout: float = 120) -> list[JobEvent]:
    async def run() -> list[JobEvent]:
        return [e async for e in queue.events(job_id)]

    return await asyncio.wait_for(run(), timeout)


async def test_readiness_sees_the_worker_consuming_every_queue(worker: WorkerProcess,
                                                               queue: CeleryDecoderQueue) -> None:
    await queue.check_workers()


async def test_a_job_per_modality_gives_a_valid_file(worker: WorkerProcess, queue: CeleryDecoderQueue,
                                                     store: S3ArtifactStore, tiny_bundle_dir: Path) -> None:
    jobs = {m: _job(store, tiny_bundle_dir, m, steps=3) for m in ("image", "video", "audio")}
    for job in jobs.values():
        await queue.submit(job)
    for modality, job in jobs.items():
        events = await _collect(queue, job.job_id)
        types = [e.type for e in events]
        assert types[0] == "queued" and types[1] == "started" and types[-1] == "completed", types
        assert [e.step for e in events if e.type == "progress"] == [1, 2, 3]
        status = await queue.status(job.job_id)
        assert status is not None and status.state == "completed" and status.artifact is not None
        data = store.read(job.artifact_key)
        if modality == "image":
            assert Image.open(io.BytesIO(data)).size == (64, 64)
        elif modality == "video":
            with av.open(io.BytesIO(data)) as container:
                stream = container.streams.video[0]
                assert stream.codec_context.name == "h264"
                assert len(list(container.decode(stream))) == 8
        else:
            samples, rate = soundfile.read(io.BytesIO(data))
            assert rate == 16000 and len(samples) == 16000
        assert status.artifact.metadata["steps"] == "3"


async def test_poison_job_fails_clearly_and_does_not_block(worker: WorkerProcess, queue: CeleryDecoderQueue,
                                                           store: S3ArtifactStore, tiny_bundle_dir: Path) -> None:
    bad = _job(store, tiny_bundle_dir, "image", shape=(77, 999))
    good = _job(store, tiny_bundle_dir, "image", steps=2)
    await queue.submit(bad)
    await queue.submit(good)
    bad_events = await _collect(queue, bad.job_id)
    assert bad_events[-1].type == "failed"
    assert "conditioning has shape [1, 77, 999], image needs [77, 32]" in (bad_events[-1].error or "")
    assert (await _collect(queue, good.job_id))[-1].type == "completed"
    assert not store.exists(bad.artifact_key)


async def test_cancel_stops_a_running_job(worker: WorkerProcess, queue: CeleryDecoderQueue,
                                          store: S3ArtifactStore, tiny_bundle_dir: Path) -> None:
    job = _job(store, tiny_bundle_dir, "video", steps=200)
    await queue.submit(job)
    async for event in queue.events(job.job_id):
        if event.type == "progress":
            await queue.cancel(job.job_id)
        if event.type in ("cancelled", "completed", "failed"):
            break
    assert event.type == "cancelled"
    assert not store.exists(job.artifact_key)
    after = _job(store, tiny_bundle_dir, "audio", steps=2)
    await queue.submit(after)
    assert (await _collect(queue, after.job_id))[-1].type == "completed"


async def test_a_job_cancelled_mid_step_ends_though_the_step_never_does(worker: WorkerProcess,
                                                                        queue: CeleryDecoderQueue,
                                                                        store: S3ArtifactStore,
                                                                        tiny_bundle_dir: Path) -> None:
    """The worker's pipelines run in a child process: a step that does not end (the child frozen with SIGSTOP, as
    a step of many minutes on a CPU) is stopped by a cancel within the poll and the stop's grace, where a worker
    running them itself held the job (and every job queued behind it) until the step ended."""
    pids = [int(p) for p in re.findall(rb"decoder process (\d+) ready", worker.log.read_bytes())]
    assert pids, "the worker runs its pipelines in a child process"
    job = _job(store, tiny_bundle_dir, "video", steps=200)
    await queue.submit(job)
    async for event in queue.events(job.job_id):
        if event.type == "progress":
            os.kill(pids[-1], signal.SIGSTOP)
            await queue.cancel(job.job_id)
            cancelled_at = time.monotonic()
        if event.type in ("cancelled", "completed", "failed"):
            break
    assert event.type == "cancelled"
    after = _job(store, tiny_bundle_dir, "image", steps=2)
    await queue.submit(after)
    assert (await _collect(queue, after.job_id))[-1].type == "completed"
    # The frozen child was killed 10 s (STOP_GRACE_S) after the stop, and a new one loaded the next job's pipelines.
    assert time.monotonic() - cancelled_at < 10 + 30
    assert not psutil.pid_exists(pids[-1]) or psutil.Process(pids[-1]).status() == psutil.STATUS_ZOMBIE
    assert len(re.findall(rb"decoder process (\d+) ready", worker.log.read_bytes())) == len(pids) + 1


async def test_queued_jobs_share_pipeline_calls_and_each_is_settled_alone(
        worker: WorkerProcess, queue: CeleryDecoderQueue, store: S3ArtifactStore, tiny_bundle_dir: Path) -> None:
    # A long clip holds the worker while the pictures queue up behind it; then it takes them as batches.
    blocker = _job(store, tiny_bundle_dir, "video", steps=20)
    await queue.submit(blocker)
    async for event in queue.events(blocker.job_id):
        if event.type == "started":
            break
    good = [_job(store, tiny_bundle_dir, "image", steps=30) for _ in range(6)]
    bad = _job(store, tiny_bundle_dir, "image", shape=(77, 999), steps=30)
    doomed = _job(store, tiny_bundle_dir, "image", steps=30)
    for job in [*good[:3], bad, doomed, *good[3:]]:
        await queue.submit(job)
    async for event in queue.events(doomed.job_id):
        if event.type == "progress":  # it runs, inside a batch: cancel it there
            await queue.cancel(doomed.job_id)
        if event.type in ("cancelled", "completed", "failed"):
            break
    assert event.type == "cancelled"
    batches = []
    for job in good:
        events = await _collect(queue, job.job_id)
        assert events[-1].type == "completed", events[-1]
        assert [e.step for e in events if e.type == "progress"] == list(range(1, 31))
        status = await queue.status(job.job_id)
        assert status is not None and status.artifact is not None
        batches.append(int(status.artifact.metadata["batch"]))
        assert Image.open(io.BytesIO(store.read(job.artifact_key))).size == (64, 64)
    assert max(batches) >= 2, batches  # pictures of one size and steps shared a pipeline call
    # The worker's /metrics: every picture's outcome (counted when its batch returns, just after its last event),
    # and calls of more than one job.
    def scrape() -> dict[str, float]:
        return metric_samples(httpx.get(worker.metrics_url).text)  # type: ignore[attr-defined]

    completed = 'nextgpt_decoder_jobs_total{modality="image",outcome="completed"}'
    for _ in range(100):
        samples = scrape()
        if samples.get(completed, 0) >= len(good) and samples.get(completed.replace("completed", "failed"), 0):
            break
        await asyncio.sleep(0.1)
    assert samples[completed] >= len(good)
    assert samples['nextgpt_decoder_jobs_total{modality="image",outcome="cancelled"}'] >= 1
    assert samples['nextgpt_decoder_jobs_total{modality="image",outcome="failed"}'] >= 1
    calls = samples['nextgpt_decoder_batch_size_count{modality="image"}']
    assert calls - samples['nextgpt_decoder_batch_size_bucket{le="1.0",modality="image"}'] >= 1
    bad_events = await _collect(queue, bad.job_id)
    assert bad_events[-1].type == "failed" and "conditioning has shape" in (bad_events[-1].error or "")
    assert not store.exists(bad.artifact_key) and not store.exists(doomed.artifact_key)
    assert (await _collect(queue, blocker.job_id))[-1].type == "completed"


async def _a_worker_dies_mid_job(queue: CeleryDecoderQueue, store: S3ArtifactStore, bundle_dir: Path,
                                 env: dict[str, str], tmp_path: Path, timeout: float) -> tuple[DecodeJob, list[JobEvent]]:
    """A video job whose worker is SIGKILLed at its second step, a fresh worker started after: the job, and its
    events to their end."""
    first = WorkerProcess("video", env, tmp_path / "first.log").wait_ready()
    try:
        job = _job(store, bundle_dir, "video", steps=16)
        await queue.submit(job)
        async for event in queue.events(job.job_id):
            if event.type == "progress" and (event.step or 0) >= 2:
                break
    finally:
        first.kill()
    second = WorkerProcess("video", env, tmp_path / "second.log").wait_ready()
    try:
        return job, await _collect(queue, job.job_id, timeout=timeout)
    finally:
        second.stop()


async def test_killed_worker_job_completes_once_on_another(env: dict[str, str], queue: CeleryDecoderQueue,
                                                           store: S3ArtifactStore, tiny_bundle_dir: Path,
                                                           tmp_path: Path, worker: WorkerProcess) -> None:
    worker.stop()  # this test owns the queue: only its own workers consume
    job, events = await _a_worker_dies_mid_job(queue, store, tiny_bundle_dir, env, tmp_path, timeout=240)
    assert events[-1].type == "completed"
    assert sum(1 for e in events if e.type == "completed") == 1
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix + "video/")
    keys = [o["Key"] for o in listing.get("Contents", []) if job.job_id in o["Key"]]
    assert keys == [job.artifact_key]
    # The second worker is the one that ran it (the first died mid-job and never acknowledged it).
    assert f"video[{job.job_id}]".encode() in (tmp_path / "second.log").read_bytes()


async def test_a_job_whose_worker_died_is_queued_again_once_its_lease_runs_out(
        env: dict[str, str], settings: Settings, store: S3ArtifactStore, tiny_bundle_dir: Path, tmp_path: Path,
        worker: WorkerProcess) -> None:
    # Celery hands out a dead worker's job again only after its visibility timeout (an hour by default): without
    # more, the job's followers would wait that hour in silence. Its follower queues it again once its lease (3 s
    # here) has run out.
    worker.stop()  # this test owns the queue: only its own workers consume
    hour = {**env, "NEXTGPT_DECODERS__VISIBILITY_TIMEOUT_S": "3600", "NEXTGPT_DECODERS__LOCK_TTL_S": "3"}
    lost: list[str] = []
    areader = redis.asyncio.Redis.from_url(settings.redis.url)
    queue = CeleryDecoderQueue(make_client_app(settings),
                               RedisJobBook(redis.Redis.from_url(settings.redis.url), settings.redis.key_prefix),
                               AsyncJobReader(areader, settings.redis.key_prefix), lost_after_s=3,
                               on_lost=lost.append)
    try:
        job, events = await _a_worker_dies_mid_job(queue, store, tiny_bundle_dir, hour, tmp_path, timeout=120)
    finally:
        await areader.aclose()
    types = [e.type for e in events]
    assert types[-1] == "completed" and types.count("completed") == 1, types
    again = max(i for i, t in enumerate(types) if t == "queued")
    assert "progress" in types[:again] and types[again + 1] == "started", types  # queued again mid-job, then run
    assert [e.step for e in events[again:] if e.type == "progress"] == list(range(1, 17))
    assert f"video[{job.job_id}]".encode() in (tmp_path / "second.log").read_bytes()
    assert store.exists(job.artifact_key)
    assert lost == ["requeued"]  # the gateway's nextgpt_gateway_decode_jobs_lost_total


@contextlib.asynccontextmanager
async def _unconsumed_queue(settings: Settings, name: str,
                            queue_wait_s: float = 600.0) -> AsyncIterator[tuple[CeleryDecoderQueue, str]]:
    """A queue under a key prefix of its own, which no worker consumes; its keys are deleted afterwards."""
    prefix = f"{settings.redis.key_prefix}{name}-{uuid.uuid4().hex[:6]}:"
    isolated = settings.model_copy(update={"redis": settings.redis.model_copy(update={"key_prefix": prefix})})
    sync = redis.Redis.from_url(settings.redis.url)
    areader = redis.asyncio.Redis.from_url(settings.redis.url)
    try:
        yield CeleryDecoderQueue(make_client_app(isolated), RedisJobBook(sync, prefix), AsyncJobReader(areader, prefix),
                                 queue_wait_s=queue_wait_s), prefix
    finally:
        for key in sync.scan_iter(f"{prefix}*"):
            sync.delete(key)
        await areader.aclose()


async def test_queued_jobs_sit_in_the_list_the_autoscaler_watches(settings: Settings, store: S3ArtifactStore,
                                                                  tiny_bundle_dir: Path) -> None:
    # The Helm chart's KEDA ScaledObject reads LLEN of "<key prefix><queue>"; no worker consumes this prefix.
    async with _unconsumed_queue(settings, "keda") as (queue, prefix):
        for _ in range(3):
            await queue.submit(_job(store, tiny_bundle_dir, "video"))
        assert queue.book.r.llen(f"{prefix}video") == 3 and queue.book.r.llen(f"{prefix}image") == 0


async def test_a_job_no_worker_takes_fails_with_no_decoder_worker(settings: Settings, store: S3ArtifactStore,
                                                                   tiny_bundle_dir: Path) -> None:
    # No worker consumes this prefix: the job must not stay "queued" forever for whoever follows or polls it.
    async with _unconsumed_queue(settings, "noworker", queue_wait_s=1.5) as (queue, _):
        book = queue.book
        followed, polled = _job(store, tiny_bundle_dir, "image"), _job(store, tiny_bundle_dir, "audio")
        await queue.submit(followed)
        await queue.submit(polled)
        events = await _collect(queue, followed.job_id, timeout=30)
        assert [e.type for e in events] == ["queued", "failed"]
        assert (events[-1].error or "").startswith("no_decoder_worker: no image decoder worker took this job")
        await asyncio.sleep(0.5)  # the second job's bound passes too
        status = await queue.status(polled.job_id)  # polled past its bound, never followed: failed all the same
        assert status is not None and status.state == "failed" and "no_decoder_worker" in (status.error or "")
        assert book.is_cancelled(followed.job_id)  # a worker that takes it late skips it
        # A job that is no longer queued is never failed this way.
        assert not fail_unclaimed(book, followed.job_id, "image", 9.0, "no_decoder_worker")
        # Readiness says which queues nobody consumes (the gateway reports it and stays ready for text).
        with pytest.raises(ServiceUnavailableError, match="no decoder worker consumes image, video, audio"):
            await queue.check_workers()


def _faulty_worker(env: dict[str, str], tmp_path: Path, hook_source: str, name: str) -> WorkerProcess:
    """An image worker whose interpreter first runs ``hook_source`` (a sitecustomize on its PYTHONPATH only)."""
    hook = tmp_path / f"hook-{name}"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(hook_source)
    pythonpath = os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return WorkerProcess("image", {**env, "PYTHONPATH": pythonpath}, tmp_path / f"{name}.log").wait_ready()


_BROKEN_DEVICE_HOOK = '''
# Test fault injection (this file is on the worker's PYTHONPATH only in the test): the accelerator "breaks" on the
# first decode, as a device-side assert does.
from services.decoders import pipelines as _pipelines

def _broken(self, *args, **kwargs):
    raise RuntimeError("CUDA error: device-side assert triggered")

_pipelines.DecoderPipelines.generate_batch = _broken
'''


async def test_a_broken_device_makes_the_worker_exit_and_the_job_goes_to_another(
        env: dict[str, str], queue: CeleryDecoderQueue, store: S3ArtifactStore, tiny_bundle_dir: Path,
        tmp_path: Path, worker: WorkerProcess) -> None:
    worker.stop()  # this test owns the queue: only its own workers consume
    broken = _faulty_worker(env, tmp_path, _BROKEN_DEVICE_HOOK, "broken")
    job = _job(store, tiny_bundle_dir, "image", steps=2)
    await queue.submit(job)
    try:
        assert broken.proc.wait(120) == 70  # EX_SOFTWARE: its supervisor restarts it; nothing more runs here
    finally:
        broken.stop()
    assert b"exiting so the supervisor restarts this worker" in (tmp_path / "broken.log").read_bytes()
    healthy = WorkerProcess("image", env, tmp_path / "healthy.log").wait_ready()
    try:
        events = await _collect(queue, job.job_id, timeout=240)
    finally:
        healthy.stop()
    assert events[-1].type == "completed"  # unacknowledged by the broken worker, run by the next one


_FLAKY_STORE_HOOK = '''
# Test fault injection (on the worker's PYTHONPATH only in the test): the first read from the artifact store fails
# as a dropped connection does, and the first write as the store's head after it does when the store is away (a
# ServiceUnavailableError); later reads and writes work.
from services.contracts.errors import ServiceUnavailableError
from services.storage import s3 as _s3

_read, _put = _s3.S3ArtifactStore.read, _s3.S3ArtifactStore.put
_failed = []

def _flaky_read(self, key, *args, **kwargs):
    if "read" not in _failed:
        _failed.append("read")
        raise ConnectionResetError("connection reset by peer")
    return _read(self, key, *args, **kwargs)

def _flaky_put(self, key, *args, **kwargs):
    if "put" not in _failed:
        _failed.append("put")
        raise ServiceUnavailableError("the artifact store is unavailable; retry later", code="storage_unavailable")
    return _put(self, key, *args, **kwargs)

_s3.S3ArtifactStore.read, _s3.S3ArtifactStore.put = _flaky_read, _flaky_put
'''


async def test_a_transient_failure_inside_a_batch_is_sent_again_and_completes(
        env: dict[str, str], queue: CeleryDecoderQueue, store: S3ArtifactStore, tiny_bundle_dir: Path,
        tmp_path: Path, worker: WorkerProcess) -> None:
    worker.stop()  # this test owns the queue: only its own worker consumes
    flaky = _faulty_worker(env, tmp_path, _FLAKY_STORE_HOOK, "flaky")
    try:
        job = _job(store, tiny_bundle_dir, "image", steps=2)
        await queue.submit(job)
        events = await _collect(queue, job.job_id, timeout=120)
    finally:
        flaky.stop()
    assert events[-1].type == "completed", events
    assert sum(1 for e in events if e.type == "completed") == 1
    assert (tmp_path / "flaky.log").read_bytes().count(b"retry in") == 2  # once for the read, once for the write
    assert store.exists(job.artifact_key)
