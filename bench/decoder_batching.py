"""Batched decoding: 8 image jobs submitted at once, run one at a time (``max_batch`` 1) and as shared pipeline
calls (``max_batch`` 8), side by side in one run, each at its bundle's default steps and size:
- the embedded decoder pool (pipelines in their own process, as served), on the tiny bundle and on the world bundle;
- with ``--busy-cores N``, N other processes each keep a core busy while the embedded and thread pools run (a
  neighbour: the LLM engine decoding the next replies, another pod on the node);
- the same pool with the pipelines on its decode thread, on the world bundle;
- a real ``nextgpt worker`` (Celery, Redis) process, on the world bundle, with its pipelines in a child process (as
  served) and, as ``celery-inline``, in the worker process itself (``decoders.engine_process`` false).
Each row is the median of ``--repeats`` rounds (the embedded pools' serial and batched rounds take turns). Reports
images per minute and the ratios. Writes bench/results/decoder_batching.json.

On a GPU (``--device cuda``: fp16 pipelines, as served there), ``--bundles`` can add ``sd-size``: the world bundle
with its image decoder replaced by one of Stable Diffusion 1.5's size (UNet and VAE, random weights) at 512x512,
the cost a real decoder has; ``--pools embedded,thread`` leaves out the Celery worker (it needs Redis)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from bench.common import bench_bundle
from services.bundle.loader import Bundle, load_bundle
from services.contracts.decoders import ARTIFACT_FORMATS, DecodeJob, new_job_id
from services.contracts.storage import new_key
from services.decoders.local_queue import LocalDecoderQueue
from services.decoders.pipeline_process import PipelineProcess
from services.decoders.pipelines import BatchGenerator, DecoderPipelines
from services.decoders.runner import DecoderRunner
from services.jobs.book import MemoryJobBook
from services.storage.local import LocalArtifactStore

WORLD = Path(__file__).parents[1] / "bundles" / "nextgpt-world"
POOLS = ("embedded", "thread", "celery", "celery-inline")
BUNDLES = ("tiny", "world", "sd-size")


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
                       repeats: int, engine_process: bool) -> dict[str, Any]:
    """A real worker process consuming the image queue with this ``max_batch``; jobs sent through Redis; the median
    of ``repeats`` rounds (``max_batch`` is a worker setting: one worker per value, so these rounds cannot
    alternate)."""
    import redis
    import redis.asyncio

    from services.clients.decoder_celery import CeleryDecoderQueue, make_client_app
    from services.contracts.settings import Settings
    from services.jobs.book import RedisJobBook
    from services.jobs.reader import AsyncJobReader
    from tests.support.workers import WorkerProcess

    prefix = f"bench-{new_job_id()[:8]}:"
    env = {"NEXTGPT_BUNDLE": str(bundle_dir), "NEXTGPT_REDIS__URL": redis_url, "NEXTGPT_REDIS__KEY_PREFIX": prefix,
           "NEXTGPT_STORAGE__BACKEND": "local", "NEXTGPT_STORAGE__LOCAL_DIR": str(workdir),
           "NEXTGPT_DECODERS__MAX_BATCH": str(max_batch),
           "NEXTGPT_DECODERS__ENGINE_PROCESS": "true" if engine_process else "false"}
    settings = Settings(**{"bundle": str(bundle_dir), "redis": {"url": redis_url, "key_prefix": prefix}})
    store = LocalArtifactStore(workdir, 10**9)
    shape = load_bundle(bundle_dir).manifest.outputs["image"].projector.output_shape
    worker = WorkerProcess("image", env, workdir / f"worker-{max_batch}-{engine_process}.log").wait_ready()
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


def sd_size_bundle(out: Path, device: str) -> Path:
    """The world bundle with an image decoder of Stable Diffusion 1.5's size: its UNet (860M parameters; cross-
    attention at the world's conditioning width, so the world's projector still feeds it) and its VAE, random
    weights in fp16, served at 512x512 and the bundle's 25 steps. Only the cost is real, not the pictures."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from services.bundle.manifest_io import read_manifest, write_manifest

    shutil.copytree(WORLD, out, dirs_exist_ok=True)
    manifest = read_manifest(out)
    image = manifest.outputs["image"]
    source = out / image.decoder.source
    torch.manual_seed(0)
    with torch.device(device):  # initialising 860M parameters is minutes on a CPU, seconds on a GPU
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=image.projector.out_dim)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            sample_size=512)
    for name, module in (("unet", unet), ("vae", vae)):
        shutil.rmtree(source / name)
        module.half().save_pretrained(str(source / name), safe_serialization=True)
    defaults = image.decoder.defaults.model_copy(update={"height": 512, "width": 512})
    decoder = image.decoder.model_copy(update={"defaults": defaults})
    outputs = {**manifest.outputs, "image": image.model_copy(update={"decoder": decoder})}
    write_manifest(out, manifest.model_copy(update={"outputs": outputs, "version": f"{manifest.version}+sd-size"}))
    return out


def _names(value: str, allowed: tuple[str, ...]) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(allowed)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per row; a row shows the median")
    parser.add_argument("--device", default="cpu", help="where the pipelines run (cuda: fp16)")
    parser.add_argument("--pools", type=lambda v: _names(v, POOLS), default=list(POOLS),
                        help="comma-separated: embedded, thread, celery, celery-inline (the Celery workers run the "
                             "world bundle)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the embedded pool's decoder process (decoders.threads; default: "
                             "torch's)")
    parser.add_argument("--busy-cores", type=int, default=0,
                        help="other processes kept busy (one core each) while the embedded and thread pools run")
    parser.add_argument("--bundles", type=lambda v: _names(v, BUNDLES), default=["tiny", "world"],
                        help="comma-separated: tiny, world, sd-size (for the embedded and thread pools)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/decoder_batching.json"))
    args = parser.parse_args()
    if "sd-size" in args.bundles and args.device == "cpu":
        parser.error("sd-size is a GPU row: at 512x512 a CPU takes minutes per picture")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        paths = {"tiny": bench_bundle, "world": lambda: WORLD,
                 "sd-size": lambda: sd_size_bundle(Path(scratch) / "sd-size", args.device)}
        # "embedded": the pool as `nextgpt serve` runs it, pipelines in their own process; "thread": the same pool
        # with the pipelines on its decode thread (decoders.engine_process false), for the difference the process
        # makes.
        for name in args.bundles:
            path = paths[name]()
            for pool in (p for p in ("embedded", "thread") if p in args.pools):
                with _busy(args.busy_cores):
                    rows += _embedded_rows(pool, name, path, args.device, args.jobs, args.repeats, args.threads)
    celery = [p for p in ("celery", "celery-inline") if p in args.pools]
    if celery:
        from tests.support.servers import redis_server

        with redis_server() as info, tempfile.TemporaryDirectory() as tmp:
            defaults = load_bundle(WORLD).manifest.outputs["image"].decoder.defaults
            for pool in celery:
                for max_batch in (1, args.jobs):
                    row = asyncio.run(_celery_rate(WORLD, max_batch, args.jobs, info.url, Path(tmp), args.repeats,
                                                   engine_process=pool == "celery"))
                    rows.append({"bundle": "world", "pool": pool, "steps": defaults.steps,
                                 "size": f"{defaults.height}x{defaults.width}", **row})
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} cores"
    print(f"{args.jobs} image jobs at once, {device}, torch threads {torch.get_num_threads()} (the embedded pool's "
          f"decoder process: {args.threads or 'the same'}), {args.busy_cores} other cores busy (embedded and thread "
          f"pools)")
    print(f"{'pool':>13} {'bundle':>7} {'steps':>5} {'size':>7} {'max_batch':>9} {'wall s':>7} {'images/min':>10}  "
          f"every round")
    for r in rows:
        print(f"{r['pool']:>13} {r['bundle']:>7} {r['steps']:>5} {r['size']:>7} {r['max_batch']:>9} {r['wall_s']:>7} "
              f"{r['images_per_min']:>10}  {' '.join(str(x) for x in r['runs'])}")

    def rate(pool: str, name: str, max_batch: int) -> float:
        row = next(r for r in rows if (r["pool"], r["bundle"], r["max_batch"]) == (pool, name, max_batch))
        return float(row["images_per_min"])

    ratios = {}
    for pool, name in dict.fromkeys((r["pool"], r["bundle"]) for r in rows):
        ratios[f"{pool} {name}"] = round(rate(pool, name, args.jobs) / rate(pool, name, 1), 2)
        print(f"{pool} {name}: batched / serial images per minute x{ratios[f'{pool} {name}']}")
    if {"embedded", "thread"} <= set(args.pools) and "world" in args.bundles:
        ratios["world serial: process / thread"] = round(rate("embedded", "world", 1) / rate("thread", "world", 1),
                                                         2)
        print(f"world, serial: the pool with its pipelines in a process / on its thread "
              f"x{ratios['world serial: process / thread']}")
    if {"celery", "celery-inline"} <= set(args.pools):
        ratios["celery serial: child / inline"] = round(rate("celery", "world", 1) / rate("celery-inline", "world", 1),
                                                        2)
        print(f"Celery worker, serial: pipelines in a child process / in the worker "
              f"x{ratios['celery serial: child / inline']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device, "busy_cores": args.busy_cores, "decoder_threads": args.threads,
                                    "rows": rows, "ratios": ratios}, indent=2))


@contextlib.contextmanager
def _busy(cores: int) -> Iterator[None]:
    """``cores`` processes that each keep a core busy, for as long as the block runs."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _embedded_rows(pool: str, name: str, path: Path, device: str, jobs: int, repeats: int,
                   threads: int | None) -> list[dict[str, Any]]:
    """Serial and batched rows of one in-process pool; their rounds take turns, in alternating order."""
    bundle = load_bundle(path)
    pipelines: BatchGenerator = (PipelineProcess(bundle, ["image"], device, threads=threads) if pool == "embedded"
                                 else DecoderPipelines(bundle, ["image"], device))
    defaults = bundle.manifest.outputs["image"].decoder.defaults
    try:
        asyncio.run(_rate(pipelines, bundle, 1, 1))  # warm-up (and the process's loading)
        runs: dict[int, list[dict[str, Any]]] = {1: [], jobs: []}
        for r in range(repeats):
            for max_batch in (1, jobs) if r % 2 == 0 else (jobs, 1):
                runs[max_batch].append(asyncio.run(_rate(pipelines, bundle, max_batch, jobs)))
    finally:
        if isinstance(pipelines, PipelineProcess):
            pipelines.close()
    return [{"bundle": name, "pool": pool, "steps": defaults.steps, "size": f"{defaults.height}x{defaults.width}",
             **_median(done)} for done in runs.values()]


if __name__ == "__main__":
    main()
