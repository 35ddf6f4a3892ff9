"""Prometheus metrics of one encoder instance, on its own registry (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class EncoderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.items = Counter("nextgpt_encoder_items", "Media items encoded", ["modality"], registry=registry)
        self.rejected = Counter("nextgpt_encoder_rejected", "Requests refused, by error code", ["code"],
                                registry=registry)
        self.batch_size = Histogram("nextgpt_encoder_batch_size", "Items per model batch", ["modality"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.latency = Histogram("nextgpt_encoder_request_seconds", "Encode request latency", registry=registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.queue_depth = Gauge("nextgpt_encoder_queue_depth", "Items waiting for a batch", ["modality"],
                                 registry=registry)
