"""Continuous batching through the public API: the embedded stack (tiny bundle, `nextgpt serve` as its own
process, so the client's parsing does not share its interpreter) on loopback, streamed POST /v1/chat,
text only, greedy, a fixed token budget. Side by side in one run: the transformers backend with its running batch
(``llm.max_batch`` 16) decoding in its own engine process (the default), the same batch decoding in the server's
process (``llm.engine_process`` off: the engine and the HTTP event loop share one interpreter lock), and batching
off (``max_batch`` 1, one reply at a time), each at concurrency 1 and 16. Reports aggregate tokens/s, median and
max time to first token, and the ratios the batching issue sets goals on (c16/c1 tok/s >= 4, c16/c1 median TTFT
<= 4); the two concurrencies of a server take turns, round by round.

Concurrency N means N closed-loop clients, each sending its next request when its last one ends. Their first
requests start spread over one reply's duration (measured alone just before), as a load tool ramps its users up:
started at the same instant, with replies all of one length, the clients stayed in lock-step and every request of
a wave arrived in a herd of 16 (the first ones' median first token 55 ms, the fourth ones' 15-25 ms), so the median
measured herds, not 16 requests in flight. A herd is a case of its own and is measured as one: each round also
sends N requests at once to the idle server (the ``burst`` rows). Writes bench/results/chat_batching.json."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.common import bench_bundle, embedded_server, time_chat_stream

KEY = "bench-key"


async def _turn(http: httpx.AsyncClient, url: str, tokens: int, seed: int) -> dict[str, float]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": f"tell me a story number {seed}"}],
                            "max_tokens": tokens, "seed": seed, "temperature": 0.0, "allowed_modalities": []}
    return await time_chat_stream(http, url, body, {"authorization": f"Bearer {KEY}"})


Wave = tuple[list[dict[str, float]], float]


async def _wave(url: str, concurrency: int, tokens: int, per_client: int) -> Wave:
    """``concurrency`` clients, each sending its next request as soon as its last one ended (a closed loop: the
    usual meaning of concurrency in serving benchmarks), client c's first request ``c / concurrency`` of a reply's
    duration after client 0's; every request counts, and the wall time includes the ramp. Every request's
    measures, and the wall time."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4), timeout=600) as http:
        alone = await _turn(http, url, tokens, 10_000)  # warm-up, and one reply's duration on the idle server

        async def client(c: int) -> list[dict[str, float]]:
            await asyncio.sleep(alone["total"] * c / concurrency)
            return [await _turn(http, url, tokens, c * 1000 + r) for r in range(per_client)]

        started = time.perf_counter()
        results = [x for xs in await asyncio.gather(*(client(c) for c in range(concurrency))) for x in xs]
        return results, time.perf_counter() - started


async def _burst(url: str, concurrency: int, tokens: int) -> Wave:
    """``concurrency`` requests sent at the same instant to the idle server (a herd: every client of an app
    coming back at once)."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4), timeout=600) as http:
        await _turn(http, url, 4, 10_000)  # warm-up: the connections' setup is not the herd's
        started = time.perf_counter()
        results = await asyncio.gather(*(_turn(http, url, tokens, 50_000 + c) for c in range(concurrency)))
        return list(results), time.perf_counter() - started


def _point(concurrency: int, arrivals: str, waves: list[Wave]) -> dict[str, Any]:
    results = [x for wave, _ in waves for x in wave]
    ttfts = [x["ttft"] for x in results]
    return {"concurrency": concurrency, "arrivals": arrivals, "requests": len(results),
            "aggregate_tok_s": round(sum(x["tokens"] for x in results) / sum(wall for _, wall in waves), 1),
            "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1), "ttft_max_ms": round(max(ttfts) * 1000, 1),
            "mean_tokens": round(statistics.mean(x["tokens"] for x in results), 1)}


@contextlib.contextmanager
def _server(bundle: Path, max_batch: int, engine_process: bool, waiting: int, threads: int,
            device: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NEXTGPT_CACHE_DIR": cache, "NEXTGPT_API_KEYS": KEY, "NEXTGPT_LOG_LEVEL": "warning",
               "NEXTGPT_LLM__MAX_BATCH": str(max_batch), "NEXTGPT_LLM__MAX_WAITING": str(waiting),
               "NEXTGPT_LLM__ENGINE_PROCESS": str(engine_process).lower(), "OMP_NUM_THREADS": str(threads),
               "NEXTGPT_LLM__DEVICE": device}
        with embedded_server(bundle, env, Path(cache) / "serve.log") as url:
            yield url


def _engine(engine_process: bool) -> str:
    return "process" if engine_process else "in-server"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4,
                        help="requests per client at the top concurrency, per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per point (the points take turns)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="the server's torch threads: the load generator needs a core of this machine too")
    parser.add_argument("--device", default="cpu", help="where the LLM decodes (NEXTGPT_LLM__DEVICE)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/chat_batching.json"))
    args = parser.parse_args()
    bundle = bench_bundle()
    rows: list[dict[str, Any]] = []
    configs = [(args.concurrency, True), (args.concurrency, False), (1, True)]
    top = args.concurrency
    for max_batch, engine_process in configs:
        with _server(bundle, max_batch, engine_process, 4 * top, args.torch_threads, args.device) as url:
            # Concurrency 1 and the top concurrency take turns, round by round, in alternating order: measured one
            # after the other, the machine's drift between the two (concurrency 1's median moved from 5.3 to 8.4
            # ms between runs of one day) went straight into their ratio.
            waves: dict[int, list[Wave]] = {1: [], top: []}
            bursts: list[Wave] = []
            for r in range(args.rounds):
                for concurrency in (1, top) if r % 2 == 0 else (top, 1):
                    # Concurrency 1 runs as many replies as the top point, so both average over as many.
                    per_client = args.requests * (top if concurrency == 1 else 1)
                    waves[concurrency].append(asyncio.run(_wave(url, concurrency, args.tokens, per_client)))
                bursts.append(asyncio.run(_burst(url, top, args.tokens)))
            engine = _engine(engine_process)
            for concurrency, done in waves.items():
                rows.append({"max_batch": max_batch, "engine": engine, **_point(concurrency, "closed loop", done)})
            rows.append({"max_batch": max_batch, "engine": engine, **_point(top, "burst", bursts)})
    print(f"/v1/chat streamed, embedded stack, tiny bundle, {args.tokens} tokens max, greedy, text only, "
          f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), server torch threads "
          f"{args.torch_threads}, LLM on {args.device}, closed-loop clients ramped over one reply, {args.rounds} "
          f"rounds per point taking turns, a burst of {top} at once per round")
    print(f"{'max_batch':>9} {'engine':>10} {'arrivals':>12} {'conc':>5} {'reqs':>5} {'agg tok/s':>10} "
          f"{'TTFT p50 ms':>12} {'TTFT max ms':>12} {'tokens':>7}")
    for r in rows:
        print(f"{r['max_batch']:>9} {r['engine']:>10} {r['arrivals']:>12} {r['concurrency']:>5} {r['requests']:>5} "
              f"{r['aggregate_tok_s']:>10} {r['ttft_p50_ms']:>12} {r['ttft_max_ms']:>12} {r['mean_tokens']:>7}")
    ratios = {}
    for max_batch, engine_process in configs:
        name = f"max_batch {max_batch}, {_engine(engine_process)}"
        mine = [r for r in rows if r["max_batch"] == max_batch and r["engine"] == _engine(engine_process)]
        low, high, herd = (next(r for r in mine if r["concurrency"] == c and r["arrivals"] == a)
                           for c, a in ((1, "closed loop"), (top, "closed loop"), (top, "burst")))
        ratios[name] = {"tok_s_ratio": round(high["aggregate_tok_s"] / low["aggregate_tok_s"], 2),
                        "ttft_p50_ratio": round(high["ttft_p50_ms"] / low["ttft_p50_ms"], 2),
                        "burst_ttft_p50_ratio": round(herd["ttft_p50_ms"] / low["ttft_p50_ms"], 2)}
        print(f"{name}: c{top}/c1 aggregate tok/s x{ratios[name]['tok_s_ratio']}, median TTFT "
              f"x{ratios[name]['ttft_p50_ratio']}; a burst of {top}'s median TTFT x{ratios[name]['burst_ttft_p50_ratio']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "ratios": ratios, "tokens": args.tokens, "device": args.device,
                                    "cores": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
