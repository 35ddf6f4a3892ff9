"""The signal-budget property, shared by the transformers and vLLM backend tests: for every budget x required set
x sampling mode, either the request is refused up front (naming max_tokens and the number needed), or the reply
holds every required modality, whole groups only, within its budget; the cases run several at a time, so each
budget is kept inside a running batch of others."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable

import numpy as np

from services.contracts.bundle_manifest import BundleManifest, Modality
from services.contracts.errors import InvalidRequestError
from services.contracts.llm import Done, GenerateParams, LLMEvent, SignalEvent, Turn
from services.llm.serving import LLMService

REQUIRED_SETS: list[list[Modality]] = [
    list(c) for n in range(4) for c in itertools.combinations(["image", "video", "audio"], n)]  # type: ignore[misc]


def budgets_around(manifest: BundleManifest) -> list[int]:
    """Budgets at and around every sum of group sizes (where an off-by-one would show), plus a few others."""
    sizes = [len(s.signal.token_ids) for s in manifest.outputs.values()]
    sums = {sum(c) for n in range(1, 4) for c in itertools.combinations(sizes, n)}
    return sorted({b for s in sums for b in (s - 1, s, s + 1)} | {1, 2, 5} - {0})


async def _replies(service: LLMService, cases: list[GenerateParams], media: np.ndarray | None,
                   at_once: int) -> list[list[LLMEvent] | InvalidRequestError]:
    """Every case's events (or its refusal), ``at_once`` of them running together: each reply keeps its own budget
    inside the running batch, beside replies of other budgets, required sets and sampling."""
    gate = asyncio.Semaphore(at_once)

    async def one(params: GenerateParams) -> list[LLMEvent] | InvalidRequestError:
        async with gate:
            try:
                return [event async for event in service.generate(params, media)]
            except InvalidRequestError as exc:
                return exc

    return await asyncio.gather(*(one(params) for params in cases))


def check_budgets(service: LLMService, manifest: BundleManifest, budgets: Iterable[int],
                  media: np.ndarray | None = None, text: str = "hello there", at_once: int = 8) -> int:
    """Runs every case; returns how many produced a reply (the others were refused)."""
    groups = {m: list(s.signal.token_ids) for m, s in manifest.outputs.items()}
    cases = list(itertools.product(budgets, REQUIRED_SETS, (0.0, 1.0)))
    params = [GenerateParams(turns=[Turn(role="user", text=text, media=[] if media is None else [0])],
                             max_tokens=budget, require_modalities=required, temperature=temperature, seed=budget)
              for budget, required, temperature in cases]
    replied = 0
    for (budget, required, temperature), events in zip(cases, asyncio.run(_replies(service, params, media, at_once)),
                                                       strict=True):
        case = f"max_tokens={budget} required={required} temperature={temperature}"
        needed = sum(len(groups[m]) for m in required)
        if isinstance(events, InvalidRequestError):
            exc = events
            assert needed > budget, f"{case}: refused although {needed} tokens fit: {exc}"
            assert exc.code == "max_tokens_too_small" and exc.param == "max_tokens" and str(needed) in exc.message
            continue
        assert needed <= budget, f"{case}: not refused although the groups need {needed}"
        replied += 1
        done = events[-1]
        assert isinstance(done, Done) and done.completion_tokens <= budget, case
        signals = [e for e in events if isinstance(e, SignalEvent)]
        assert set(required) <= {s.modality for s in signals}, f"{case}: got {[s.modality for s in signals]}"
        ids = done.token_ids
        firsts = {ids_[0]: m for m, ids_ in groups.items()}
        starts = [i for i, t in enumerate(ids) if t in firsts]
        assert len(starts) == len(signals), f"{case}: {len(starts)} groups started, {len(signals)} delivered"
        for start in starts:
            group = groups[firsts[ids[start]]]
            assert ids[start:start + len(group)] == group, f"{case}: partial group at {start}: {ids}"
        signal_ids = {t for g in groups.values() for t in g}
        assert sum(1 for t in ids if t in signal_ids) == sum(len(groups[s.modality]) for s in signals), case
    return replied
