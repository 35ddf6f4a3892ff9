"""Prometheus metrics of a decoder pool: how many jobs end how, how many share a pipeline call, and how long calls
take. In embedded mode they are served by `nextgpt serve`'s /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# A world picture is ~0.1-1 s on a CPU, an SD-sized one ~1 s on a GPU, a real clip up to minutes.
_CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class DecoderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter("nextgpt_decoder_jobs", "Decode attempts by modality and outcome (completed, "
                            "cancelled, failed, transient: tried again)", ["modality", "outcome"], registry=registry)
        self.batch_size = Histogram("nextgpt_decoder_batch_size", "Jobs sharing one pipeline call", ["modality"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.call_seconds = Histogram("nextgpt_decoder_call_seconds", "Seconds per pipeline call (all its jobs)",
                                      ["modality"], buckets=_CALL_BUCKETS, registry=registry)
