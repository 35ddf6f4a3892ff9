"""How long what the stack writes is kept: decode conditionings (intermediates, useless once their job ended) and
generated media. Where the store has lifecycle rules (S3) they expire objects by themselves (in whole days, as S3
counts); otherwise, and for retentions shorter than a day, a sweeper deletes what is older, every
``sweep_every_s``."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from services.contracts.storage import ArtifactStore

log = logging.getLogger(__name__)

CONDITIONING = "conditioning"
MEDIA_KINDS = ("image", "video", "audio")


@dataclass(frozen=True)
class RetentionPolicy:
    conditioning_s: float | None
    artifacts_s: float | None

    def kinds(self) -> list[tuple[str, float]]:
        out = [(CONDITIONING, self.conditioning_s)] if self.conditioning_s else []
        return out + [(kind, self.artifacts_s) for kind in MEDIA_KINDS if self.artifacts_s]


class Retention:
    def __init__(self, store: ArtifactStore, policy: RetentionPolicy, sweep_every_s: float = 3600.0) -> None:
        self.store, self.policy, self.sweep_every_s = store, policy, sweep_every_s
        self._native: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def configure(self) -> None:
        """Hand whole-day retentions to the store's own lifecycle rules where it has them."""
        for kind, seconds in self.policy.kinds():
            if seconds % 86400 == 0 and self.store.expire_natively(kind, math.ceil(seconds / 86400)):
                self._native.add(kind)

    def sweep(self, now: datetime | None = None) -> dict[str, int]:
        """Delete what the store does not expire itself; how many objects of each kind."""
        now = now or datetime.now(timezone.utc)
        removed = {}
        for kind, seconds in self.policy.kinds():
            if kind not in self._native:
                removed[kind] = self.store.sweep(kind, now - timedelta(seconds=seconds))
        if any(removed.values()):
            log.info("retention: removed %s", removed)
        return removed

    async def start(self) -> None:
        if not self.policy.kinds():
            return
        await asyncio.to_thread(self.configure)
        self._task = asyncio.create_task(self._loop(), name="retention-sweeper")

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sweep)
            except Exception as exc:  # the store away for a while (readiness says so): the next round tries again
                log.warning("retention sweep failed (%s: %s); next try in %.0f s", type(exc).__name__, exc,
                            self.sweep_every_s)
            await asyncio.sleep(self.sweep_every_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
