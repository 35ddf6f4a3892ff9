"""What the benchmarks share: the tiny bundle they run on, timing one streamed generation."""

from __future__ import annotations

import os
import time
from pathlib import Path

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


def bench_bundle() -> Path:
    """The tiny bundle the benchmarks use, built once into the cache folder."""
    from services.bundle.tiny.build import build_tiny_bundle

    bundle_dir = Path(os.environ.get("NEXTGPT_CACHE_DIR", ".cache")) / "bench-bundle"
    if not (bundle_dir / "bundle.json").exists():
        build_tiny_bundle(bundle_dir, force=True)
    return bundle_dir
