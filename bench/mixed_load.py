"""Chat beside decoding: the embedded stack (world bundle, ``nextgpt serve`` as its own process) on loopback, with
the decoder process's torch threads
- switching (the default): one per core, and the cores the LLM engine leaves while it generates
  (``decoders.threads_beside_llm``);
- one per core always (``threads_beside_llm`` 0: as before the switch);
- ``--threads`` always (``decoders.threads``),
side by side in one run (all servers up, their rounds taking turns). Each round, on one server:
- chat alone: ``--chatters`` closed-loop clients stream text-only replies for ``--seconds``;
- beside decoding: ``--images`` drawings are asked for at once (non-streaming, ``require_modalities`` image, the
  bundle's default steps and size) while the same clients stream text-only replies until the drawings are back;
- drawings alone: the same drawings with no chat.
Reports the drawings' wall time (images per minute) beside chat and alone, and the text replies' median time to
first token and median tokens per second, alone and beside the decoding: what a chat user feels while other users'
pictures decode. Writes bench/results/mixed_load.json."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.common import embedded_server, time_chat_stream

KEY = "bench-key"
WORLD = Path(__file__).parents[1] / "bundles" / "nextgpt-world"
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "star")


async def _text(http: httpx.AsyncClient, seed: int, tokens: int) -> dict[str, float]:
    body = {"messages": [{"role": "user", "content": "What colours are there?"}], "max_tokens": tokens, "seed": seed,
            "allowed_modalities": []}
    return await time_chat_stream(http, "", body)


async def _drawing(http: httpx.AsyncClient, i: int) -> None:
    body = {"messages": [{"role": "user", "content": f"Draw a {COLOURS[i % 4]} {SHAPES[i // 4 % 4]}."}],
            "max_tokens": 48, "seed": i, "require_modalities": ["image"], "wait_s": 600}
    reply = (await http.post("/v1/chat", json=body)).raise_for_status().json()
    states = [a["state"] for a in reply["artifacts"]]
    if states != ["completed"]:
        raise RuntimeError(f"drawing {i}: {states}")


async def _round(url: str, chatters: int, tokens: int, images: int, seconds: float) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=900,
                                 limits=httpx.Limits(max_connections=chatters + images + 4)) as http:
        await _text(http, 0, 4)  # warm-up

        async def chat(c: int, until: asyncio.Event | float) -> list[dict[str, float]]:
            done: list[dict[str, float]] = []
            while not (until.is_set() if isinstance(until, asyncio.Event) else time.perf_counter() > until):
                done.append(await _text(http, c * 1000 + len(done), tokens))
            return done

        alone = await asyncio.gather(*(chat(c, time.perf_counter() + seconds) for c in range(chatters)))
        drawn = asyncio.Event()

        async def draw() -> float:
            started = time.perf_counter()
            try:
                await asyncio.gather(*(_drawing(http, i) for i in range(images)))
            finally:
                drawn.set()
            return time.perf_counter() - started

        wall, *beside = await asyncio.gather(draw(), *(chat(c, drawn) for c in range(chatters)))
        alone_wall = await draw()
    return {"alone": [x for xs in alone for x in xs], "beside": [x for xs in beside for x in xs], "draw_s": wall,
            "draw_alone_s": alone_wall}


def _summary(replies: list[dict[str, float]]) -> dict[str, Any]:
    rates = [(x["tokens"] - 1) / (x["total"] - x["ttft"]) for x in replies
             if x["tokens"] > 1 and x["total"] > x["ttft"]]
    return {"replies": len(replies), "ttft_p50_ms": round(statistics.median(x["ttft"] for x in replies) * 1000, 1),
            "tok_s_p50": round(statistics.median(rates), 1) if rates else None}


@contextlib.contextmanager
def _server(name: str, settings: dict[str, str], workdir: Path) -> Iterator[str]:
    slug = name.split()[0]
    env = {**os.environ, "NEXTGPT_CACHE_DIR": str(workdir / f"cache-{slug}"), "NEXTGPT_API_KEYS": KEY,
           "NEXTGPT_LOG_LEVEL": "warning"} | settings
    env.pop("OMP_NUM_THREADS", None)  # every process keeps torch's default, but what is measured
    with embedded_server(WORLD, env, workdir / f"serve-{slug}.log") as url:
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="the fixed decoder threads to compare with")
    parser.add_argument("--chatters", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0, help="how long the chatters stream alone per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/mixed_load.json"))
    args = parser.parse_args()
    configs = {"switching (default)": {}, "every core": {"NEXTGPT_DECODERS__THREADS_BESIDE_LLM": "0"},
               f"{args.threads} always": {"NEXTGPT_DECODERS__THREADS": str(args.threads)}}
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        urls = {c: stack.enter_context(_server(c, env, Path(tmp))) for c, env in configs.items()}
        order = list(configs)
        for r in range(args.rounds):
            for c in order[r % len(order):] + order[:r % len(order)]:
                runs[c].append(asyncio.run(_round(urls[c], args.chatters, args.tokens, args.images, args.seconds)))
    rows = []
    for c, done in runs.items():
        per_min = {k: round(args.images / statistics.median(x[k] for x in done) * 60, 1)
                   for k in ("draw_s", "draw_alone_s")}
        rows.append({"decoder_threads": c, "images_per_min": per_min["draw_s"],
                     "images_per_min_alone": per_min["draw_alone_s"],
                     "draw_s_runs": [round(x["draw_s"], 2) for x in done],
                     "draw_alone_s_runs": [round(x["draw_alone_s"], 2) for x in done],
                     "alone": _summary([y for x in done for y in x["alone"]]),
                     "beside": _summary([y for x in done for y in x["beside"]])})
    print(f"embedded stack, world bundle, {os.cpu_count()} cores; {args.images} drawings at once beside "
          f"{args.chatters} text streams ({args.tokens} tokens max) and alone, {args.rounds} rounds per server, "
          f"taking turns")
    print(f"{'decoder threads':>19} {'img/min beside chat':>19} {'alone':>6} {'TTFT ms alone':>13} {'beside':>7} "
          f"{'tok/s alone':>11} {'beside':>7} {'replies beside':>14}")
    for row in rows:
        print(f"{row['decoder_threads']:>19} {row['images_per_min']:>19} {row['images_per_min_alone']:>6} "
              f"{row['alone']['ttft_p50_ms']:>13} {row['beside']['ttft_p50_ms']:>7} {row['alone']['tok_s_p50']!s:>11} "
              f"{row['beside']['tok_s_p50']!s:>7} {row['beside']['replies']:>14}")
    for row in rows:
        print(f"  {row['decoder_threads']}: drawing s beside chat {row['draw_s_runs']}, "
              f"alone {row['draw_alone_s_runs']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cores": os.cpu_count(), "images": args.images, "chatters": args.chatters,
                                    "tokens": args.tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
