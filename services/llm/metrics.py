from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class LLMMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("nextgpt_llm_requests", "Generations by outcome", ["outcome"], registry=registry)
        self.tokens = Counter("nextgpt_llm_generated_tokens", "Tokens generated", registry=registry)
        self.signals = Counter("nextgpt_llm_signal_groups", "Signal groups emitted", ["modality", "forced"],
                               registry=registry)
        self.ttft = Histogram("nextgpt_llm_ttft_seconds", "Time to first token", registry=registry,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tokens_per_s = Histogram("nextgpt_llm_tokens_per_second", "Decode speed per generation",
                                      registry=registry, buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000))
        self.waiting = Gauge("nextgpt_llm_queue_depth", "Generations waiting for the model", registry=registry)
        self.running = Gauge("nextgpt_llm_running", "Generations running", registry=registry)
