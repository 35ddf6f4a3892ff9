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
from services.contracts.llm import Accepted, Done, GenerateParams, LLMEvent, SignalEvent, TextDelta
from services.contracts.settings import LLMSettings
from services.contracts.bundle_manifest import BundleManifest
from services.llm.activity import Activity
from services.llm.channel import EventChannel
from services.llm.metrics import LLMMetrics
from services.llm.reply_trim import ReplyTrim
from services.llm.signals import check_signal_budget


class Backend(Protocol):
    def generate(self, params: GenerateParams, media: np.ndarray | None, emit: object,
                 cancelled: threading.Event) -> None: ...

    def close(self) -> None: ...


class LLMService:
    def __init__(self, backend: Backend, settings: LLMSettings, metrics: LLMMetrics, manifest: BundleManifest) -> None:
        self.backend, self.settings, self.metrics, self.manifest = backend, settings, metrics, manifest
        self.hidden_size = manifest.llm.hidden_size
        # A thread per admitted generation (it waits while the backend decodes it inside a batch).
        slots = settings.max_batch + settings.max_waiting
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="llm")
        self._slots = threading.BoundedSemaphore(slots)
        self.activity = Activity()  # generations admitted and not yet ended, for what shares the machine

    def check_ready(self) -> None:
        """Raise ``ServiceUnavailableError`` when the backend can no longer serve (its engine process died)."""
        check = getattr(self.backend, "check_alive", None)
        if check is not None:
            check()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    def _check(self, params: GenerateParams, media: np.ndarray | None) -> None:
        if params.max_tokens is not None and params.max_tokens > self.settings.max_tokens:
            raise InvalidRequestError(f"max_tokens {params.max_tokens} exceeds the limit of {self.settings.max_tokens}",
                                      code="max_tokens_too_large", param="max_tokens")
        check_signal_budget(self.manifest, params.require_modalities, params.max_tokens)
        count = 0 if media is None else len(media)
        if count > self.settings.max_media:
            raise PayloadTooLargeError(f"{count} media items exceed the limit of {self.settings.max_media}",
                                       code="too_many_media", param="media")
        if media is not None and (media.ndim not in (2, 3) or media.shape[-1] != self.hidden_size):
            raise InvalidRequestError(f"media vectors must be (items, {self.hidden_size}) or (items, tokens, "
                                      f"{self.hidden_size})", code="invalid_media_embeddings", param="media")

    async def generate(self, params: GenerateParams, media: np.ndarray | None) -> AsyncIterator[LLMEvent]:
        self._check(params, media)
        if not self._slots.acquire(blocking=False):
            self.metrics.requests.labels("overloaded").inc()
            raise ServiceUnavailableError("too many generations waiting; retry later", code="overloaded")
        channel = EventChannel(asyncio.get_running_loop())
        cancelled = threading.Event()

        def work() -> None:
            tracker = _Running(channel.put, self.metrics)
            try:
                with self.activity.running():
                    self.backend.generate(params, media, ReplyTrim(tracker), cancelled)
            except BaseException as exc:  # delivered to the consumer, which raises it
                channel.put(exc)
            finally:
                tracker.close()
                self._slots.release()
                channel.end()

        self._executor.submit(work)
        outcome = "error"
        try:
            async for item in channel.items():
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, (Accepted, TextDelta, SignalEvent, Done))
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
    """Queue-depth and running gauges of one generation: waiting until its first token, running until done."""

    def __init__(self, emit: object, metrics: LLMMetrics) -> None:
        self.emit, self.metrics, self.started = emit, metrics, False
        metrics.waiting.inc()

    def __call__(self, event: LLMEvent) -> None:
        if not self.started and not isinstance(event, Accepted):
            self.started = True
            self.metrics.waiting.dec()
            self.metrics.running.inc()
        self.emit(event)  # type: ignore[operator]

    def close(self) -> None:
        if self.started:
            self.metrics.running.dec()
        else:
            self.metrics.waiting.dec()
