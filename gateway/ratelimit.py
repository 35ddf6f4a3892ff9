"""Per-caller rate limit: a token bucket per API key hash (per gateway replica), refilled continuously."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from services.contracts.errors import RateLimitError


class RateLimiter:
    def __init__(self, per_minute: int | None, burst: int | None = None, max_callers: int = 100_000) -> None:
        self.rate = per_minute / 60.0 if per_minute else None
        self.capacity = float(burst or per_minute or 1)
        self.max_callers = max_callers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, caller: str | None) -> None:
        if self.rate is None:
            return
        key = caller or "anonymous"
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise RateLimitError(f"rate limit exceeded; retry in {wait:.1f} s", code="rate_limited",
                                     retry_after_s=wait)
            self._buckets[key] = (tokens - 1.0, now)
            while len(self._buckets) > self.max_callers:
                self._buckets.popitem(last=False)
