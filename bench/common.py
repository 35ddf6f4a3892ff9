"""What the benchmarks share: the tiny bundle they run on, timing one streamed generation (from the LLM service,
or through the public API's SSE)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from services.clients.llm_http import HttpLLMClient
from services.contracts.llm import Accepted, Done, GenerateParams


async def time_generation(client: HttpLLMClient, params: GenerateParams,
                          media: np.ndarray | None) -> tuple[float, int, float]:
    """(seconds to the first token, completion tokens, seconds in all)."""
    started, first, count = time.perf_counter(), None, 0
    async for event in client.generate(params, media):
        if first is None and not isinstance(event, Accepted):  # taken, not yet answered
            first = time.perf_counter() - started
        if isinstance(event, Done):
            count = event.completion_tokens
    return first or 0.0, count, time.perf_counter() - started


async def time_chat_stream(http: httpx.AsyncClient, url: str, body: dict[str, Any],
                           headers: dict[str, str] | None = None) -> dict[str, float]:
    """One streamed POST /v1/chat: seconds to the first text (``ttft``), completion tokens (``usage``: a model may
    stop early) and seconds in all (``total``)."""
    started, out, name = time.perf_counter(), {"tokens": 0.0}, ""
    async with http.stream("POST", f"{url}/v1/chat", json={**body, "stream": True}, headers=headers) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                if name == "message.delta":
                    out.setdefault("ttft", time.perf_counter() - started)
                elif name == "done":
                    out["tokens"] = json.loads(line[6:])["usage"]["completion_tokens"]
                elif name == "error":
                    raise RuntimeError(line)
    out["total"] = time.perf_counter() - started
    out.setdefault("ttft", out["total"])
    return out


def bench_bundle() -> Path:
    """The tiny bundle the benchmarks use, built once into the cache folder."""
    from services.bundle.tiny.build import build_tiny_bundle

    bundle_dir = Path(os.environ.get("NEXTGPT_CACHE_DIR", ".cache")) / "bench-bundle"
    if not (bundle_dir / "bundle.json").exists():
        build_tiny_bundle(bundle_dir, force=True)
    return bundle_dir


@contextlib.contextmanager
def embedded_server(bundle: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    """``nextgpt serve`` on ``bundle`` as a process of its own (so the client's work does not share its interpreter)
    on a free loopback port, with ``env`` (its settings) and its output in ``log``; its URL once /readyz says so."""
    from tests.support.servers import _stop, free_port, wait_until

    port = free_port()
    with log.open("wb") as out:
        # ``-m``, not the console script: a machine with the repository on PYTHONPATH and no install has none.
        proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "serve", "--bundle", str(bundle),
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 300, "nextgpt serve", proc, log)
            yield url
        finally:
            _stop(proc)
