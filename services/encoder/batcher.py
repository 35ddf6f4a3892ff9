"""Dynamic batching: concurrent requests of one modality are grouped up to a batch size or a wait bound and run
through the model together, on one worker thread (the model is not re-entrant and the CPU is the bottleneck)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from services.contracts.errors import ServiceUnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 8
    max_wait_ms: float = 0.0
    max_queue: int = 256


@dataclass
class _Pending:
    tensor: torch.Tensor
    future: asyncio.Future[torch.Tensor]


class DynamicBatcher:
    """Batches ``(views...)`` tensors of one shape; ``run`` maps a stacked batch to one output row per item."""

    def __init__(self, name: str, run: Callable[[torch.Tensor], torch.Tensor], config: BatchingConfig,
                 executor: ThreadPoolExecutor, on_batch: Callable[[str, int], None] | None = None) -> None:
        self.name, self.run, self.config, self.executor = name, run, config, executor
        self.on_batch = on_batch
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=config.max_queue)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self.queue.empty():
            pending = self.queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(ServiceUnavailableError("encoder is shutting down", code="shutting_down"))

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    async def submit(self, tensor: torch.Tensor) -> torch.Tensor:
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Pending(tensor, future))
        except asyncio.QueueFull:
            raise ServiceUnavailableError(
                f"encoder {self.name} queue is full ({self.config.max_queue}); retry later", code="overloaded"
            ) from None
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            # Take whatever queued up while the model was busy: batches form under load at no added latency.
            while len(batch) < self.config.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            deadline = loop.time() + self.config.max_wait_ms / 1000
            while len(batch) < self.config.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            # Requests cancelled while queued (client gone) cost nothing.
            batch = [p for p in batch if not p.future.done()]
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        if self.on_batch:
            self.on_batch(self.name, len(batch))
        try:
            out = await loop.run_in_executor(self.executor, self.run, torch.stack([p.tensor for p in batch]))
            results: list[torch.Tensor | BaseException] = list(out)
        except Exception as exc:  # e.g. out of memory on a large batch: retry one by one
            if len(batch) == 1:
                log.exception("encoder %s failed on one item", self.name)
                results = [exc]
            else:
                log.warning("encoder %s batch of %d failed (%s); retrying items singly", self.name, len(batch), exc)
                for pending in batch:
                    await self._run([pending])
                return
        for pending, result in zip(batch, results):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
