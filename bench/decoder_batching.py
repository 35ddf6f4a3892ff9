"""Batched decoding: 8 image jobs submitted at once to the embedded decoder pool, run one at a time
(``max_batch`` 1) and as shared pipeline calls (``max_batch`` 8), side by side in one run, on the tiny bundle and on
the world bundle, each at its bundle's default steps and size. Reports images per minute and the ratio.
Writes bench/results/decoder_batching.json."""

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
from services.bundle.loader import load_bundle
from services.contracts.decoders import ARTIFACT_FORMATS, DecodeJob, new_job_id
from services.contracts.storage import new_key
from services.decoders.local_queue import LocalDecoderQueue
from services.decoders.pipelines import DecoderPipelines
from services.decoders.runner import DecoderRunner
from services.jobs.book import MemoryJobBook
from services.storage.local import LocalArtifactStore

WORLD = Path(__file__).parents[1] / "bundles" / "nextgpt-world"


async def _rate(pipelines: DecoderPipelines, max_batch: int, jobs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalArtifactStore(Path(tmp), 10**9)
        book = MemoryJobBook()
        queue = LocalDecoderQueue(DecoderRunner(pipelines, store, book, pipelines.bundle.manifest), book,
                                  max_batch=max_batch)
        shape = pipelines.bundle.manifest.outputs["image"].projector.output_shape
        try:
            submitted = []
            started = time.perf_counter()
            for i in range(jobs):
                cond = store.put_new("conditioning", save({"conditioning": torch.randn(1, *shape)}),
                                     "application/octet-stream")
                job_id = new_job_id()
                job = DecodeJob(job_id=job_id, modality="image", conditioning_key=cond.key,
                                artifact_key=new_key("image", ARTIFACT_FORMATS["image"][0], uid=job_id))
                await queue.submit(job)
                submitted.append(job)
            ends = [[e async for e in queue.events(job.job_id)][-1] for job in submitted]
            wall = time.perf_counter() - started
        finally:
            queue.close()
    assert all(e.type == "completed" for e in ends), ends
    return {"max_batch": max_batch, "jobs": jobs, "wall_s": round(wall, 2),
            "images_per_min": round(jobs / wall * 60, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/decoder_batching.json"))
    args = parser.parse_args()
    rows = []
    for name, path in (("tiny", bench_bundle()), ("world", WORLD)):
        bundle = load_bundle(path)
        pipelines = DecoderPipelines(bundle, ["image"])
        defaults = bundle.manifest.outputs["image"].decoder.defaults
        asyncio.run(_rate(pipelines, 1, 1))  # warm-up
        for max_batch in (1, args.jobs):
            row = asyncio.run(_rate(pipelines, max_batch, args.jobs))
            rows.append({"bundle": name, "steps": defaults.steps, "size": f"{defaults.height}x{defaults.width}", **row})
    print(f"embedded decoder pool, {args.jobs} image jobs at once, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'bundle':>6} {'steps':>5} {'size':>7} {'max_batch':>9} {'wall s':>7} {'images/min':>10}")
    for r in rows:
        print(f"{r['bundle']:>6} {r['steps']:>5} {r['size']:>7} {r['max_batch']:>9} {r['wall_s']:>7} "
              f"{r['images_per_min']:>10}")
    ratios = {}
    for name in ("tiny", "world"):
        serial, batched = (next(r for r in rows if r["bundle"] == name and r["max_batch"] == b) for b in (1, args.jobs))
        ratios[name] = round(batched["images_per_min"] / serial["images_per_min"], 2)
        print(f"{name}: batched / serial images per minute x{ratios[name]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
