"""The gateway's own Prometheus metrics: every HTTP request (by route template, never by raw path), open chat
streams, time to first token as clients see it, and how generated media end."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("nextgpt_gateway_requests_total", "HTTP requests", ["route", "method", "status"],
                                registry=registry)
        self.latency = Histogram("nextgpt_gateway_request_seconds", "Request start to response end (streams: "
                                 "to the last event)", ["route"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.first_byte = Histogram("nextgpt_gateway_response_start_seconds", "Request start to response headers",
                                    ["route"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.streams = Gauge("nextgpt_gateway_streams_active", "Chat turns being produced", registry=registry)
        self.ttft = Histogram("nextgpt_gateway_ttft_seconds", "Chat request to first LLM token, in the gateway",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.artifacts = Counter("nextgpt_gateway_artifacts_total", "Generated media by outcome",
                                 ["modality", "state"], registry=registry)
        self.lost_jobs = Counter("nextgpt_gateway_decode_jobs_lost_total",
                                 "Decode jobs found running with no worker (lease gone): queued again, or failed the "
                                 "third time (distributed mode)", ["outcome"], registry=registry)


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        def route() -> str:
            matched = scope.get("route")
            return getattr(matched, "path", None) or "unmatched"

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.first_byte.labels(route()).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            self.metrics.requests.labels(route(), scope["method"], str(status)).inc()
            self.metrics.latency.labels(route()).observe(time.perf_counter() - started)
