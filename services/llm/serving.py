"""LLMService: request bounds, a bounded wait for the model, a thread per generation, cancellation when the
consumer goes away (the generation stops at its next token and frees the model)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from services.contracts.errors import InvalidRequestError, PayloadTooLargeError, ServiceUnavailableError
from services.contracts.llm import Done, GenerateParams, LLMEvent, SignalEvent, TextDelta
from services.contracts.settings import LLMSettings
from services.llm.metrics import LLMMetrics

_END = object()


class Backend(Protocol):
    def generate(self, params: GenerateParams, media: np.ndarray | None, emit: object,
                 cancelled: threading.Event) -> None: ...


class LLMService:
    def __init__(self, backend: Backend, settings: LLMSettings, metrics: LLMMetrics, hidden_size: int) -> None:
        self.backend, self.settings, self.metrics, self.hidden_size = backend, settings, metrics, hidden_size
        self._executor = ThreadPoolExecutor(max_workers=settings.max_waiting + 1, thread_name_prefix="llm")
        self._slots = threading.BoundedSemaphore(settings.max_waiting + 1)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _check(self, params: GenerateParams, media: np.ndarray | None) -> None:
        if params.max_tokens is not None and params.max_tokens > self.settings.max_tokens:
            raise InvalidRequestError(f"max_tokens {params.max_tokens} exceeds the limit of {self.settings.max_tokens}",
                                      code="max_tokens_too_large", param="max_tokens")
        count = 0 if media is None else len(media)
        if count > self.settings.max_media:
            raise PayloadTooLargeError(f"{count} media items exceed the limit of {self.settings.max_media}",
                                       code="too_many_media", param="media")
        if media is not None and (media.ndim != 2 or media.shape[1] != self.hidden_size):
            raise InvalidRequestError(f"media vectors must be (items, {self.hidden_size})",
                                      code="invalid_media_embeddings", param="media")

    async def generate(self, params: GenerateParams, media: np.ndarray | None) -> AsyncIterator[LLMEvent]:
        self._check(params, media)
        if not self._slots.acquire(blocking=False):
            self.metrics.requests.labels("overloaded").inc()
            raise ServiceUnavailableError("too many generations waiting; retry later", code="overloaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(event: LLMEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def work() -> None:
            tracker = _Running(emit, self.metrics)
            try:
                self.backend.generate(params, media, tracker, cancelled)
            except BaseException as exc:  # delivered to the consumer, which raises it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                tracker.close()
                self._slots.release()
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        self._executor.submit(work)
        outcome = "error"
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, (TextDelta, SignalEvent, Done))
                if isinstance(item, SignalEvent):
                    self.metrics.signals.labels(item.modality, str(item.forced).lower()).inc()
                if isinstance(item, Done):
                    outcome = item.finish_reason
                    self._observe(item)
                yield item
        finally:
            if outcome == "error" and not cancelled.is_set():
                outcome = "disconnected"
            # Whoever stops reading (client gone, caller closed the iterator) stops the generation.
            cancelled.set()
            self.metrics.requests.labels(outcome).inc()

    def _observe(self, done: Done) -> None:
        self.metrics.tokens.inc(done.completion_tokens)
        ttft = done.timings.get("ttft_ms", 0.0) / 1000
        self.metrics.ttft.observe(ttft)
        decode_s = (done.timings.get("total_ms", 0.0) / 1000) - ttft
        if done.completion_tokens > 1 and decode_s > 0:
            self.metrics.tokens_per_s.observe((done.completion_tokens - 1) / decode_s)


class _Running:
    """Queue-depth and running gauges of one generation: waiting until its first event, running until done."""

    def __init__(self, emit: object, metrics: LLMMetrics) -> None:
        self.emit, self.metrics, self.started = emit, metrics, False
        metrics.waiting.inc()

    def __call__(self, event: LLMEvent) -> None:
        if not self.started:
            self.started = True
            self.metrics.waiting.dec()
            self.metrics.running.inc()
        self.emit(event)  # type: ignore[operator]

    def close(self) -> None:
        if self.started:
            self.metrics.running.dec()
        else:
            self.metrics.waiting.dec()
