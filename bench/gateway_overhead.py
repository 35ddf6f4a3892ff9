"""The distributed stack as separate processes (gateway, encoder, LLM service, a Celery worker, Redis, an S3
server), tiny bundle. At concurrency 1/8/32, side by side in one run: time to first token through the gateway
(POST /v1/chat, SSE) and directly against the LLM service (same prompt, same token budget), their ratio (the
gateway's overhead), tokens/s through the gateway, and time to the first artifact (an image, asked for with
require_modalities). Beside them, a bare Python hop (``bench.bare_proxy``: same server stack, none of the
gateway's work): the floor any proxy in front of the LLM service costs on this machine. Prints a table; writes
bench/results/gateway.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis.asyncio

from bench.common import bench_bundle
from services.contracts.llm import GenerateParams, GenerateRequest, Turn
from tests.support.processes import ServiceProcess
from tests.support.servers import free_port, redis_server, redis_transactions, s3_server, wait_until
from tests.support.stack import distributed_stack

PROMPT = "tell me a story"


async def _direct(http: httpx.AsyncClient, url: str, tokens: int, seed: int) -> float:
    """Seconds to the first token of the LLM service's NDJSON stream (its first line, ``accepted``, comes before
    the prefill), read the way ``_gateway`` reads the gateway's SSE (one client library, lines, parsed only until
    the first token): the ratio compares the two servers, not two clients."""
    params = GenerateParams(turns=[Turn(role="user", text=PROMPT)], max_tokens=tokens, seed=seed, temperature=0.0)
    body = GenerateRequest(params=params).model_dump_json()
    started, first = time.perf_counter(), None
    async with http.stream("POST", f"{url}/v1/generate", content=body,
                           headers={"content-type": "application/json"}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line and first is None:
                kind = json.loads(line)["type"]
                if kind == "error":
                    raise RuntimeError(line)
                if kind != "accepted":
                    first = time.perf_counter() - started
    assert first is not None
    return first


async def _gateway(http: httpx.AsyncClient, url: str, auth: dict[str, str], tokens: int, seed: int,
                   media: list[str] | None = None) -> dict[str, float]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPT}], "stream": True, "max_tokens": tokens,
                            "seed": seed, "temperature": 0.0}
    if media:
        body |= {"require_modalities": media, "decoder": {"steps": 4}}
    started, out, name = time.perf_counter(), {}, ""
    async with http.stream("POST", f"{url}/v1/chat", json=body, headers=auth) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                now = time.perf_counter() - started
                if name == "message.delta":
                    out.setdefault("ttft", now)
                elif name == "artifact.completed":
                    out.setdefault("first_artifact", now)
                elif name == "done":
                    out["tokens"] = json.loads(line[6:])["usage"]["completion_tokens"]
                elif name == "error":
                    raise RuntimeError(line)
    out["total"] = time.perf_counter() - started
    return out


async def _point(gateways: dict[str, str], llm_url: str, redis_url: str, auth: dict[str, str], concurrency: int,
                 tokens: int, rounds: int) -> list[dict[str, Any]]:
    """One row per gateway (same LLM service, same Redis), each path measured in turn within every round."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=600) as http, \
            redis.asyncio.Redis.from_url(redis_url) as watcher:
        await _direct(http, llm_url, 4, 0)  # warm every path
        for url in gateways.values():
            await _gateway(http, url, auth, 4, 0)
        direct_ttft: list[float] = []
        ttft: dict[str, list[float]] = {name: [] for name in gateways}
        rate: dict[str, list[float]] = {name: [] for name in gateways}
        writes: dict[str, int] = dict.fromkeys(gateways, 0)
        streams: dict[str, int] = dict.fromkeys(gateways, 0)
        # A wave of ``concurrency`` requests gives that many TTFTs; at low concurrency the LLM's own TTFT varies
        # more than the gateway adds, so small points run several waves per round. The paths take turns wave by
        # wave, in an order that rotates: measured in blocks (24 direct requests, then 24 through a gateway), each
        # block ran on a machine left in a different state by the one before (the LLM's compute threads still
        # hot from its previous request right away, or not), which moved the c1 ratio by 0.5 from run to run.
        waves = max(1, 24 // concurrency)
        paths = ["direct", *gateways]
        for r in range(rounds):
            for w in range(waves):
                turn = r * waves + w
                seeds = range(turn * 1000, turn * 1000 + concurrency)
                for path in paths[turn % len(paths):] + paths[:turn % len(paths)]:
                    started = time.perf_counter()
                    if path == "direct":
                        direct_ttft += await asyncio.gather(*(_direct(http, llm_url, tokens, s) for s in seeds))
                        await asyncio.sleep(0.2)  # as after a gateway wave: every wave starts on an idle machine
                        continue
                    before = await redis_transactions(watcher)
                    runs = await asyncio.gather(*(_gateway(http, gateways[path], auth, tokens, s) for s in seeds))
                    wall = time.perf_counter() - started
                    await asyncio.sleep(0.2)  # the streams' last writes (the end is written before `done`)
                    writes[path] += await redis_transactions(watcher) - before
                    streams[path] += len(runs)
                    ttft[path] += [x["ttft"] for x in runs]
                    rate[path].append(sum(x["tokens"] for x in runs) / wall)
    d = statistics.median(direct_ttft)
    return [{"gateway": name, "concurrency": concurrency, "ttft_direct_ms": round(d * 1000, 1),
             "ttft_gateway_ms": round(statistics.median(ttft[name]) * 1000, 1),
             "overhead_ratio": round(statistics.median(ttft[name]) / d, 3),
             "overhead_ratio_ci95": _ratio_interval(ttft[name], direct_ttft),
             "gateway_tok_s": round(statistics.median(rate[name]), 1),
             "redis_transactions_per_stream": round(writes[name] / streams[name], 1)} for name in gateways]


def _ratio_interval(gateway: list[float], direct: list[float], draws: int = 4000) -> list[float]:
    """A 95% bootstrap interval of the ratio of the two medians: how far this run's samples alone leave it open
    (runs differ by more than that on a busy machine: the interval says what one run can tell, not all)."""
    rng = np.random.default_rng(0)
    g, d = np.asarray(gateway), np.asarray(direct)
    ratios = np.median(rng.choice(g, (draws, g.size)), axis=1) / np.median(rng.choice(d, (draws, d.size)), axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return [round(float(low), 3), round(float(high), 3)]


async def _first_artifact(url: str, auth: dict[str, str], concurrency: int, rounds: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=600) as http:
        values = []
        for r in range(rounds):
            runs = await asyncio.gather(*(_gateway(http, url, auth, 16, r * 100 + i, ["image"])
                                          for i in range(concurrency)))
            values += [x["first_artifact"] for x in runs]
    return {"concurrency": concurrency, "first_artifact_p50_ms": round(statistics.median(values) * 1000, 1),
            "first_artifact_max_ms": round(max(values) * 1000, 1)}


class BareProxy:
    def __init__(self, llm_url: str, log: Path) -> None:
        self.llm_url, self.log, self.port = llm_url, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BareProxy:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "bench.bare_proxy", "--llm-url", self.llm_url,
                                          "--port", str(self.port)], stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200, 60, "bare proxy",
                   self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    # NEXTGPT_LLM__THREADS for the LLM's decoding; 0: the service's default (on CPU all cores but one, left to the
    # gateway, Redis and this client, with which it shares the machine).
    parser.add_argument("--llm-threads", type=int, default=0)
    # NEXTGPT_LLM__CPUS for its engine process ("auto", "1,3-5"); default: unbound, the service's default.
    parser.add_argument("--llm-cpus", default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gateway.json"))
    args = parser.parse_args()
    bundle_dir = bench_bundle()
    logs = Path(tempfile.mkdtemp(prefix="nextgpt-bench-"))
    extra = {"NEXTGPT_LLM__MAX_WAITING": "128"} | (
        {"NEXTGPT_LLM__THREADS": str(args.llm_threads)} if args.llm_threads else {}) | (
        {"NEXTGPT_LLM__CPUS": args.llm_cpus} if args.llm_cpus else {})
    with redis_server() as redis_info, s3_server() as s3, \
            distributed_stack(redis_info.url, f"{redis_info.key_prefix}bench:", s3, bundle_dir, logs, extra) as stack:
        llm_url = stack.services["llm"].ready_url.removesuffix("/readyz")
        # Side by side: the second replica restarted with every event written to Redis as it comes (the
        # behaviour before REPLAY_WRITE_LINGER_S), the first with the default linger.
        second = stack.services["gateway2"]
        second.stop()
        unlingered = ServiceProcess(second.args, {**stack.env, "NEXTGPT_GATEWAY__REPLAY_WRITE_LINGER_S": "0"},
                                    logs / "gateway-no-linger.log", second.ready_url).start().wait_ready()
        # The floor: a bare Python hop (bench.bare_proxy) on the same server stack, doing none of a gateway's work.
        bare = BareProxy(llm_url, logs / "bare-proxy.log").start()
        gateways = {"linger 0.02 s": stack.url, "no linger": stack.url2, "bare hop": bare.url}
        try:
            rows = [row for c in (1, 8, 32) for row in asyncio.run(
                _point(gateways, llm_url, redis_info.url, stack.auth, c, args.tokens, args.rounds))]
            artifacts = [asyncio.run(_first_artifact(stack.url, stack.auth, c, 2)) for c in (1, 8)]
        finally:
            bare.stop()
            unlingered.stop()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    threads = f"{args.llm_threads or 'default (all cores but one)'}" + (
        f", engine bound to CPUs {args.llm_cpus}" if args.llm_cpus else "")
    print(f"Gateway vs LLM service direct, distributed stack on loopback, tiny bundle, transformers backend, "
          f"{args.tokens} tokens greedy, median TTFT over {args.rounds} rounds of at least 24 requests per path, "
          f"the paths taking turns wave by wave, LLM torch threads {threads} ({machine})")
    print(f"{'gateway':>14} {'conc':>5} {'TTFT direct ms':>15} {'TTFT gateway ms':>16} {'ratio':>7} "
          f"{'ratio 95% CI':>14} {'gateway tok/s':>14} {'Redis tx/stream':>16}")
    for r in rows:
        low, high = r["overhead_ratio_ci95"]
        print(f"{r['gateway']:>14} {r['concurrency']:>5} {r['ttft_direct_ms']:>15} {r['ttft_gateway_ms']:>16} "
              f"{r['overhead_ratio']:>7} {f'{low}-{high}':>14} {r['gateway_tok_s']:>14} "
              f"{r['redis_transactions_per_stream']:>16}")
    print("Time to first artifact (image, 4 steps, 64x64) through the gateway:")
    for a in artifacts:
        print(f"  concurrency {a['concurrency']}: p50 {a['first_artifact_p50_ms']} ms, max {a['first_artifact_max_ms']} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "tokens": args.tokens, "rounds": args.rounds,
                                    "llm_threads": args.llm_threads or None, "llm_cpus": args.llm_cpus, "ttft": rows,
                                    "first_artifact": artifacts}, indent=2))


if __name__ == "__main__":
    main()
