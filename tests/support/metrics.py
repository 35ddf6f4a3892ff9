"""Reading a Prometheus /metrics page in tests: each sample line as its series (name and labels) -> value."""

from __future__ import annotations


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}
