"""Timing one streamed generation against the LLM service, shared by the benchmarks."""

from __future__ import annotations

import time

import numpy as np

from services.clients.llm_http import HttpLLMClient
from services.contracts.llm import Done, GenerateParams


async def time_generation(client: HttpLLMClient, params: GenerateParams,
                          media: np.ndarray | None) -> tuple[float, int, float]:
    """(seconds to the first event, completion tokens, seconds in all)."""
    started, first, count = time.perf_counter(), None, 0
    async for event in client.generate(params, media):
        if first is None:
            first = time.perf_counter() - started
        if isinstance(event, Done):
            count = event.completion_tokens
    return first or 0.0, count, time.perf_counter() - started
