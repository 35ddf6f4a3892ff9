"""Batched decoding: 8 image jobs submitted at once, run one at a time (``max_batch`` 1) and as shared pipeline
calls (``max_batch`` 8), side by side in one run, each at its bundle's default steps and size:
- the embedded decoder pool (pipelines in their own process, as served), on the tiny bundle and on the world bundle;
- the same pool with the pipelines on its decode thread, on the world bundle;
- a real ``nextgpt worker`` (Celery, Redis) process, on the world bundle.
Each row is the median of ``--repeats`` rounds (the embedded pools' serial and batched rounds take turns). Reports
images per minute and the ratios. Writes bench/results/decoder_batching.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from bench.common import bench_bundle
from services.bundle.loader import Bundle, load_bundle
from services.clients.decoder_celery import CeleryDecoderQueue, make_client_app
from services.contracts.settings import Settings
from services.jobs.book import RedisJobBook
from services.jobs.reader import AsyncJobReader
from services.contracts.decoders import ARTIFACT_FORMATS, DecodeJob, new_job_id
from services.contracts.storage import new_key
from services.decoders.local_queue import LocalDecoderQueue
from services.decoders.pipeline_process import PipelineProcess
from services.decoders.pipelines import BatchGenerator, DecoderPipelines
from services.decoders.runner import DecoderRunner
from services.jobs.book import MemoryJobBook
from services.storage.local import LocalArtifactStore

WORLD = Path(__file__).parents[1] / "bundles" / "nextgpt-world"


def _image_job(store: LocalArtifactStore, shape: tuple[int, ...]) -> DecodeJob:
    cond = store.put_new("conditioning", save({"conditioning": torch.randn(1, *shape)}), "application/octet-stream")
    job_id = new_job_id()
    return DecodeJob(job_id=job_id, modality="image", conditioning_key=cond.key,
                     artifact_key=new_key("image", ARTIFACT_FORMATS["image"][0], uid=job_id))


async def _last_event(queue: Any, job_id: str) -> Any:
    """Every job followed at once, as a gateway follows a turn's jobs (one after another, a job's wait to be
    followed would count as decode time)."""
    return [e async for e in queue.events(job_id)][-1]


async def _rate(pipelines: BatchGenerator, bundle: Bundle, max_batch: int, jobs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalArtifactStore(Path(tmp), 10**9)
        book = MemoryJobBook()
        queue = LocalDecoderQueue(DecoderRunner(pipelines, store, book, bundle.manifest), book, max_batch=max_batch)
        shape = bundle.manifest.outputs["image"].projector.output_shape
        try:
            submitted = []
            started = time.perf_counter()
            for _ in range(jobs):
                job = _image_job(store, shape)
                await queue.submit(job)
                submitted.append(job)
            ends = await asyncio.gather(*(_last_event(queue, job.job_id) for job in submitted))
            wall = time.perf_counter() - started
        finally:
            queue.close()
    assert all(e.type == "completed" for e in ends), ends
    return _round_result(max_batch, jobs, wall)


def _round_result(max_batch: int, jobs: int, wall: float) -> dict[str, Any]:
    return {"max_batch": max_batch, "jobs": jobs, "wall_s": round(wall, 2),
            "images_per_min": round(jobs / wall * 60, 1)}


async def _celery_rate(bundle_dir: Path, max_batch: int, jobs: int, redis_url: str, workdir: Path,
                       repeats: int) -> dict[str, Any]:
    """A real worker process consuming the image queue with this ``max_batch``; jobs sent through Redis; the median
    of ``repeats`` rounds (``max_batch`` is a worker setting: one worker per value, so these rounds cannot
    alternate)."""
    import redis
    import redis.asyncio

    from tests.support.workers import WorkerProcess

    prefix = f"bench-{new_job_id()[:8]}:"
    env = {"NEXTGPT_BUNDLE": str(bundle_dir), "NEXTGPT_REDIS__URL": redis_url, "NEXTGPT_REDIS__KEY_PREFIX": prefix,
           "NEXTGPT_STORAGE__BACKEND": "local", "NEXTGPT_STORAGE__LOCAL_DIR": str(workdir),
           "NEXTGPT_DECODERS__MAX_BATCH": str(max_batch)}
    settings = Settings(**{"bundle": str(bundle_dir), "redis": {"url": redis_url, "key_prefix": prefix}})
    store = LocalArtifactStore(workdir, 10**9)
    shape = load_bundle(bundle_dir).manifest.outputs["image"].projector.output_shape
    worker = WorkerProcess("image", env, workdir / f"worker-{max_batch}.log").wait_ready()
    areader = redis.asyncio.Redis.from_url(redis_url)
    queue = CeleryDecoderQueue(make_client_app(settings), RedisJobBook(redis.Redis.from_url(redis_url), prefix),
                               AsyncJobReader(areader, prefix, block_ms=200))

    async def run(count: int) -> list[Any]:
        submitted = [_image_job(store, shape) for _ in range(count)]
        for job in submitted:
            await queue.submit(job)
        return await asyncio.gather(*(_last_event(queue, job.job_id) for job in submitted))

    done = []
    try:
        await run(1)  # warm-up: the worker loads its pipeline on the first job
        for _ in range(repeats):
            started = time.perf_counter()
            ends = await run(jobs)
            wall = time.perf_counter() - started
            assert all(e.type == "completed" for e in ends), ends
            done.append(_round_result(max_batch, jobs, wall))
            await asyncio.sleep(0.5)  # the last job's events settled before the next round
    finally:
        worker.stop()
        await areader.aclose()
    return _median(done)


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median rate, with every run's rate."""
    ranked = sorted(runs, key=lambda run: run["images_per_min"])
    return {**ranked[(len(ranked) - 1) // 2], "runs": [run["images_per_min"] for run in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per row; a row shows the median")
    parser.add_argument("--out", type=Path, default=Path("bench/results/decoder_batching.json"))
    args = parser.parse_args()
    rows = []
    # "embedded": the pool as `nextgpt serve` runs it, pipelines in their own process; "thread": the same pool with
    # the pipelines on its decode thread (decoders.engine_process false), for the difference the process makes.
    for pool, name, path in (("embedded", "tiny", bench_bundle()), ("embedded", "world", WORLD),
                             ("thread", "world", WORLD)):
        bundle = load_bundle(path)
        pipelines = PipelineProcess(bundle, ["image"]) if pool == "embedded" else DecoderPipelines(bundle, ["image"])
        defaults = bundle.manifest.outputs["image"].decoder.defaults
        try:
            asyncio.run(_rate(pipelines, bundle, 1, 1))  # warm-up (and the process's loading)
            runs: dict[int, list[dict[str, Any]]] = {1: [], args.jobs: []}
            for r in range(args.repeats):  # serial and batched take turns, in alternating order
                for max_batch in (1, args.jobs) if r % 2 == 0 else (args.jobs, 1):
                    runs[max_batch].append(asyncio.run(_rate(pipelines, bundle, max_batch, args.jobs)))
            for max_batch, done in runs.items():
                rows.append({"bundle": name, "pool": pool, "steps": defaults.steps,
                             "size": f"{defaults.height}x{defaults.width}", **_median(done)})
        finally:
            if isinstance(pipelines, PipelineProcess):
                pipelines.close()
    from tests.support.servers import redis_server

    with redis_server() as info, tempfile.TemporaryDirectory() as tmp:
        defaults = load_bundle(WORLD).manifest.outputs["image"].decoder.defaults
        for max_batch in (1, args.jobs):
            row = asyncio.run(_celery_rate(WORLD, max_batch, args.jobs, info.url, Path(tmp), args.repeats))
            rows.append({"bundle": "world", "pool": "celery", "steps": defaults.steps,
                         "size": f"{defaults.height}x{defaults.width}", **row})
    print(f"{args.jobs} image jobs at once, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'pool':>8} {'bundle':>6} {'steps':>5} {'size':>7} {'max_batch':>9} {'wall s':>7} {'images/min':>10}  "
          f"every round")
    for r in rows:
        print(f"{r['pool']:>8} {r['bundle']:>6} {r['steps']:>5} {r['size']:>7} {r['max_batch']:>9} {r['wall_s']:>7} "
              f"{r['images_per_min']:>10}  {' '.join(str(x) for x in r['runs'])}")
    def rate(pool: str, name: str, max_batch: int) -> float:
        row = next(r for r in rows if (r["pool"], r["bundle"], r["max_batch"]) == (pool, name, max_batch))
        return float(row["images_per_min"])

    ratios = {}
    for pool, name in (("embedded", "tiny"), ("embedded", "world"), ("thread", "world"), ("celery", "world")):
        ratios[f"{pool} {name}"] = round(rate(pool, name, args.jobs) / rate(pool, name, 1), 2)
        print(f"{pool} {name}: batched / serial images per minute x{ratios[f'{pool} {name}']}")
    ratios["world serial: process / thread"] = round(rate("embedded", "world", 1) / rate("thread", "world", 1), 2)
    print(f"world, serial: the pool with its pipelines in a process / on its thread "
          f"x{ratios['world serial: process / thread']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
