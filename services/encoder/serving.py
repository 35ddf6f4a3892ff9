"""EncoderService: validate, decode (off the event loop), batch through the model, project, sum segments."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from anyio import CapacityLimiter, to_thread

from services.contracts.encoder import EncodeResult, InputModality, MediaInput
from services.contracts.settings import EncoderSettings
from services.contracts.errors import (
    InvalidRequestError,
    NextGPTError,
    PayloadTooLargeError,
    UnsupportedMediaError,
)
from services.contracts.storage import ArtifactStore
from services.encoder.batcher import BatchingConfig, DynamicBatcher
from services.encoder.media import is_container, sniff
from services.encoder.metrics import EncoderMetrics
from services.encoder.model import EncoderModel
from services.encoder.preprocess.audio import preprocess_audio
from services.encoder.preprocess.container_audio import container_modality
from services.encoder.preprocess.image import animated, preprocess_image
from services.encoder.preprocess.video import preprocess_video

MODALITIES: tuple[InputModality, ...] = ("image", "audio", "video")


class EncoderService:
    def __init__(self, model: EncoderModel, limits: EncoderSettings, metrics: EncoderMetrics,
                 store: ArtifactStore | None = None) -> None:
        self.model, self.limits, self.metrics, self.store = model, limits, metrics, store
        self.batching = BatchingConfig(max_batch=limits.max_batch, max_wait_ms=limits.max_wait_ms,
                                       max_queue=limits.max_queue)
        self._decode_limiter = CapacityLimiter(limits.decode_workers)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-model")
        self.batchers: dict[InputModality, DynamicBatcher] = {}

    async def start(self) -> None:
        for modality in MODALITIES:
            batcher = DynamicBatcher(modality, self._model_fn(modality), self.batching, self._executor,
                                     on_batch=lambda name, n: self.metrics.batch_size.labels(name).observe(n))
            batcher.start()
            self.batchers[modality] = batcher

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _model_fn(self, modality: InputModality) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda batch: self.model.features(modality, batch)

    @property
    def hidden_size(self) -> int:
        return self.model.hidden_size

    async def encode(self, items: list[MediaInput], segments: list[list[str]] | None = None) -> EncodeResult:
        started = time.perf_counter()
        try:
            result = await self._encode(items, segments)
        except NextGPTError as exc:
            self.metrics.rejected.labels(exc.code).inc()
            raise
        self.metrics.latency.observe(time.perf_counter() - started)
        return result

    async def _encode(self, items: list[MediaInput], segments: list[list[str]] | None) -> EncodeResult:
        groups = self._check_request(items, segments)
        loaded = await asyncio.gather(*(self._load(item) for item in items))
        modalities = {item.name: modality for item, (modality, _) in zip(items, loaded)}
        for group in groups:
            kinds = {modalities[name] for name in group}
            if len(kinds) > 1:
                raise InvalidRequestError(f"segment {group} mixes modalities {sorted(kinds)}",
                                          code="mixed_segment", param="segments")
        tensors = await asyncio.gather(*(self._decode(item, m, data) for item, (m, data) in zip(items, loaded)))
        for modality, batcher in self.batchers.items():
            self.metrics.queue_depth.labels(modality).set(batcher.depth)
        embeddings = await asyncio.gather(
            *(self.batchers[m].submit(t) for (m, _), t in zip(loaded, tensors))
        )
        for modality, _ in loaded:
            self.metrics.items.labels(modality).inc()
        projected = self.model.project(list(embeddings))  # (items, tokens per item, hidden)
        index = {item.name: i for i, item in enumerate(items)}
        vectors = torch.stack([projected[[index[n] for n in group]].sum(dim=0) for group in groups])
        if self.model.tokens_per_item == 1:  # the release's layout: one vector per segment
            vectors = vectors.squeeze(1)
        return EncodeResult(embeddings=vectors.numpy().astype(np.float32),
                            modalities=[modalities[group[0]] for group in groups])

    def _check_request(self, items: list[MediaInput], segments: list[list[str]] | None) -> list[list[str]]:
        if not items:
            raise InvalidRequestError("no media to encode", code="no_media", param="files")
        if len(items) > self.limits.max_files:
            raise PayloadTooLargeError(f"{len(items)} files exceed the limit of {self.limits.max_files}",
                                       code="too_many_files", param="files")
        names = [item.name for item in items]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidRequestError(f"file names must be unique: {duplicates}", code="duplicate_file", param="files")
        if segments is None:
            return [[n] for n in names]
        flat = [n for group in segments for n in group]
        unknown = sorted(set(flat) - set(names))
        if unknown or any(not g for g in segments):
            raise InvalidRequestError(f"segments name unknown files {unknown} or are empty", code="invalid_segments",
                                      param="segments")
        if sorted(flat) != sorted(names):
            raise InvalidRequestError("every file must be in exactly one segment", code="invalid_segments",
                                      param="segments")
        return segments

    async def _load(self, item: MediaInput) -> tuple[InputModality, bytes]:
        if item.data is not None:
            data = item.data
        elif item.key is not None and self.store is not None:
            head = await to_thread.run_sync(self.store.head, item.key)
            if head.size > self.limits.max_file_bytes:
                raise PayloadTooLargeError(f"{item.name}: {head.size} bytes exceed the limit",
                                           code="file_too_large", param=item.name)
            data = await to_thread.run_sync(self.store.read, item.key)
        else:
            raise InvalidRequestError(f"{item.name}: no data and no usable key", code="no_media", param=item.name)
        if not data:
            raise InvalidRequestError(f"{item.name}: file is empty", code="empty_file", param=item.name)
        if len(data) > self.limits.max_file_bytes:
            raise PayloadTooLargeError(f"{item.name}: {len(data)} bytes exceed the limit of "
                                       f"{self.limits.max_file_bytes}", code="file_too_large", param=item.name)
        found = sniff(data)
        if found is None:
            raise UnsupportedMediaError(f"{item.name}: not an image, audio or video file we can read",
                                        code="unsupported_media", param=item.name)
        if is_container(data):
            found = await to_thread.run_sync(container_modality, data, item.name, limiter=self._decode_limiter)
        elif found == "image" and await to_thread.run_sync(animated, data, limiter=self._decode_limiter):
            found = "video"  # an animated GIF is a clip: "what happens in this GIF?" is about its motion
        if item.modality is not None and item.modality != found:
            raise UnsupportedMediaError(f"{item.name}: declared {item.modality} but the content is {found}",
                                        code="modality_mismatch", param=item.name)
        return found, data

    async def _decode(self, item: MediaInput, modality: InputModality, data: bytes) -> torch.Tensor:
        limits = self.limits
        if modality == "image":
            fn = lambda: preprocess_image(data, item.name, limits.max_image_pixels)  # noqa: E731
        elif modality == "audio":
            fn = lambda: preprocess_audio(data, item.name, limits.max_audio_seconds)  # noqa: E731
        else:
            fn = lambda: preprocess_video(data, item.name, limits.max_video_seconds, limits.max_video_pixels)  # noqa: E731
        return await to_thread.run_sync(fn, limiter=self._decode_limiter)
