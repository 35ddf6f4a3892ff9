"""LLM service over HTTP: TTFT and tokens/s at concurrency 1/8/32 for each backend that runs here
(transformers always; vllm when .venv-vllm exists), tiny bundle, and the c8/c1 aggregate ratio; then the vLLM
pooler's cost per signal group, old wire vs new. Prints tables; writes bench/results/llm_stream.json."""

from __future__ import annotations

import argparse
import contextlib
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client import CollectorRegistry

from services.bundle.loader import Bundle, load_bundle
from services.clients.llm_http import HttpLLMClient
from bench.common import bench_bundle, time_generation
from services.contracts.llm import GenerateParams, Turn
from services.contracts.settings import LLMSettings
from services.llm.app import build_llm_app
from services.llm.compose import build_llm_service
from tests.support.servers import UvicornThread, wait_until


async def _one(client: HttpLLMClient, tokens: int, seed: int) -> tuple[float, int, float]:
    params = GenerateParams(turns=[Turn(role="user", text="tell me a story", media=[0])], max_tokens=tokens,
                            seed=seed, temperature=0.0)
    media = np.random.default_rng(seed).standard_normal((1, 128)).astype(np.float32)
    return await time_generation(client, params, media)


async def _point(url: str, concurrency: int, tokens: int) -> dict[str, float]:
    client = HttpLLMClient(url, max_connections=concurrency)
    try:
        await _one(client, 4, 0)
        started = time.perf_counter()
        results = await asyncio.gather(*(_one(client, tokens, i) for i in range(concurrency)))
        wall = time.perf_counter() - started
    finally:
        await client.aclose()
    ttfts = [r[0] for r in results]
    total = sum(r[1] for r in results)
    return {"concurrency": concurrency, "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
            "ttft_max_ms": round(max(ttfts) * 1000, 1), "aggregate_tok_s": round(total / wall, 1),
            "per_stream_tok_s": round(statistics.median(r[1] / r[2] for r in results), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/llm_stream.json"))
    args = parser.parse_args()
    bundle_dir = bench_bundle()
    bundle = load_bundle(bundle_dir)
    rows = []
    backends = [("transformers", {})]
    vllm_python = Path(os.environ.get("NEXTGPT_BENCH_VLLM_PYTHON", ".venv-vllm/bin/python")).absolute()
    with contextlib.ExitStack() as stack:
        if vllm_python.exists():
            from tests.support.vllm import vllm_processes

            info = stack.enter_context(vllm_processes(str(vllm_python), bundle))
            backends.append(("vllm", {"backend": "vllm", "vllm_url": info.server_url,
                                      "vllm_pooler_url": info.pooler_url}))
        else:
            print(f"({vllm_python} missing: `make vllm-env` adds the vllm backend to this benchmark)")
        for name, extra in backends:
            registry = CollectorRegistry()
            settings = LLMSettings(max_waiting=64, **extra)
            app = build_llm_app(lambda s=settings, r=registry: build_llm_service(bundle, s, r), registry)
            with UvicornThread(app) as server:
                wait_until(lambda u=server.url: httpx.get(f"{u}/readyz").status_code == 200, 120, "llm")
                for concurrency in (1, 8, 32):
                    rows.append({"backend": name, **asyncio.run(_point(server.url, concurrency, args.tokens))})
        groups = _pooler_groups(bundle, info.pooler_url) if vllm_python.exists() else []
    print(f"LLM service, tiny bundle, {args.tokens} tokens per request, greedy, {os.cpu_count()} cores")
    print(f"{'backend':>12} {'conc':>5} {'TTFT p50 ms':>12} {'TTFT max ms':>12} {'agg tok/s':>10} {'stream tok/s':>13}")
    for r in rows:
        print(f"{r['backend']:>12} {r['concurrency']:>5} {r['ttft_p50_ms']:>12} {r['ttft_max_ms']:>12} "
              f"{r['aggregate_tok_s']:>10} {r['per_stream_tok_s']:>13}")
    ratios = {}
    for name in dict(backends):
        low, high = (next(r for r in rows if r["backend"] == name and r["concurrency"] == c) for c in (1, 8))
        ratios[name] = round(high["aggregate_tok_s"] / low["aggregate_tok_s"], 2)
        print(f"{name}: c8/c1 aggregate tok/s x{ratios[name]}")
    if groups:
        print("hidden states of one signal group from the vLLM pooler (prompt of 1000 tokens + 100 generated):")
        print(f"{'wire':>28} {'conc':>5} {'request KiB':>12} {'p50 ms':>8}")
        for g in groups:
            print(f"{g['wire']:>28} {g['concurrency']:>5} {g['request_kib']:>12} {g['p50_ms']:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "ratios_c8_c1": ratios, "pooler_groups": groups,
                                    "tokens": args.tokens}, indent=2))


def _pooler_groups(bundle: Bundle, pooler_url: str) -> list[dict[str, object]]:
    """One signal group's hidden states: the whole sequence's embeddings with every group (the old wire) vs the
    prompt's once and token ids after (the pooler keeps the prompt), alone and 8 callers at once."""
    import base64
    import concurrent.futures
    import uuid

    from safetensors.torch import save as save_tensors

    hidden = bundle.manifest.llm.hidden_size
    prompt = torch.randn(1000, hidden)
    generated = list(range(100, 200))
    table = torch.randn(bundle.manifest.llm.vocab_size, hidden)  # only the old wire's byte count depends on it

    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(save_tensors({"tensor": t.contiguous()})).decode()

    def body(wire: str, key: str) -> dict[str, object]:
        positions = list(range(1090, 1094))
        if wire == "full sequence every group":
            return {"prompt": b64(torch.cat([prompt, table[generated]])), "prompt_key": uuid.uuid4().hex,
                    "positions": positions}
        return {"prompt_key": key, "token_ids": generated, "positions": positions}

    out = []
    with httpx.Client(timeout=120) as http:
        key = uuid.uuid4().hex
        http.post(f"{pooler_url}/v1/states", json={"prompt": b64(prompt), "prompt_key": key,
                                                   "positions": [0]}).raise_for_status()
        for wire in ("full sequence every group", "prompt once, then token ids"):
            for concurrency in (1, 8):
                def call(_: int) -> float:
                    started = time.perf_counter()
                    http.post(f"{pooler_url}/v1/states", json=body(wire, key)).raise_for_status()
                    return time.perf_counter() - started

                with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                    times = list(pool.map(call, range(8 * concurrency)))
                out.append({"wire": wire, "concurrency": concurrency,
                            "request_kib": round(len(json.dumps(body(wire, key))) / 1024, 1),
                            "p50_ms": round(statistics.median(times) * 1000, 1)})
    return out


if __name__ == "__main__":
    main()
