"""Encoder throughput over HTTP at concurrency 1/8/32, dynamic batching on (max_batch 8) vs off (max_batch 1),
measured side by side in one run on the tiny bundle. Prints a table with the on/off ratio; writes JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry

from services.bundle.loader import load_bundle
from services.bundle.tiny.build import build_tiny_bundle
from services.clients.encoder_http import HttpEncoderClient
from services.contracts.encoder import MediaInput
from services.contracts.settings import EncoderSettings
from services.encoder.app import build_encoder_app
from services.encoder.compose import build_encoder_service
from tests.support import media
from tests.support.servers import UvicornThread, wait_until


async def _throughput(url: str, concurrency: int, requests: int, payload: list[MediaInput]) -> float:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as http:
        client = HttpEncoderClient(url, http)
        await client.encode(payload)  # warm-up
        queue = list(range(requests))

        async def worker() -> None:
            while queue:
                queue.pop()
                await client.encode(payload)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--modality", choices=["image", "audio"], default="image")
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(f"bench/results/encoder_batching_{args.modality}.json")
    bundle_dir = args.bundle or Path(os.environ.get("NEXTGPT_CACHE_DIR", ".cache")) / "bench-bundle"
    if not (bundle_dir / "bundle.json").exists():
        build_tiny_bundle(bundle_dir, force=True)
    bundle = load_bundle(bundle_dir)
    payload = [MediaInput(name="x.png", data=media.png())] if args.modality == "image" else \
        [MediaInput(name="x.wav", data=media.wav(seconds=4))]

    rows = []
    servers = {}
    for label, max_batch in (("on", 8), ("off", 1)):
        settings = EncoderSettings(max_batch=max_batch, max_wait_ms=args.max_wait_ms)
        registry = CollectorRegistry()
        app = build_encoder_app(lambda s=settings, r=registry: build_encoder_service(bundle, s, r), registry,
                                settings.max_request_bytes)
        servers[label] = UvicornThread(app).__enter__()
        wait_until(lambda u=servers[label].url: httpx.get(f"{u}/readyz").status_code == 200, 120, "encoder")
    try:
        for concurrency in (1, 8, 32):
            rates = {label: asyncio.run(_throughput(servers[label].url, concurrency, args.requests, payload))
                     for label in ("on", "off")}
            rows.append({"concurrency": concurrency, "batching_on_rps": round(rates["on"], 2),
                         "batching_off_rps": round(rates["off"], 2), "ratio": round(rates["on"] / rates["off"], 2)})
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)

    print(f"encoder throughput, {args.modality}, max_wait {args.max_wait_ms} ms, {args.requests} requests per point, tiny bundle, "
          f"{platform.machine()} {os.cpu_count()} cores")
    print(f"{'concurrency':>11} {'on req/s':>9} {'off req/s':>10} {'on/off':>7}")
    for row in rows:
        print(f"{row['concurrency']:>11} {row['batching_on_rps']:>9} {row['batching_off_rps']:>10} {row['ratio']:>7}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"modality": args.modality, "max_wait_ms": args.max_wait_ms, "rows": rows, "cores": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
