"""Reading a Prometheus /metrics page in tests: each sample line as its series (name and labels) -> value."""

from __future__ import annotations

import httpx


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def metric(url: str, series: str) -> float:
    """One series' value (``name`` or ``name{labels}``) on the server at ``url``; 0 while it has no sample."""
    return samples(httpx.get(f"{url}/metrics").text).get(series, 0.0)
