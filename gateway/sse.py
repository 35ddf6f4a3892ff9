"""Server-sent events: named events with ids, JSON data, and comment heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def sse_event(event_id: int | None, name: str, data: dict[str, object]) -> bytes:
    """``event_id`` None: an event that is not part of the replayable stream (the client keeps its last id)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


HEARTBEAT = b": ping\n\n"


async def batches(items: AsyncIterator[T], heartbeat_s: float, max_batch: int = 256) -> AsyncIterator[list[T]]:
    """``items`` regrouped: each list holds what was ready at once (at most ``max_batch``); an empty list when
    nothing came for ``heartbeat_s``. A reader task runs ahead by at most one bounded queue, so a slow client
    still holds back the source. Errors of ``items`` are raised here; ``items`` is closed at the end."""
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=max_batch)

    async def read() -> None:
        try:
            async for item in items:
                await queue.put(item)
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put(exc)
        await queue.put(_END)

    reader = asyncio.create_task(read())
    try:
        while True:
            try:
                async with asyncio.timeout(heartbeat_s):
                    first = await queue.get()
            except TimeoutError:
                yield []
                continue
            batch = [first]
            while not queue.empty() and len(batch) < max_batch:
                batch.append(queue.get_nowait())
            done = next((i for i, item in enumerate(batch) if item is _END or isinstance(item, Exception)), None)
            if done is not None:
                if batch[:done]:
                    yield batch[:done]  # type: ignore[misc]
                if isinstance(batch[done], Exception):
                    raise batch[done]  # type: ignore[misc]
                return
            yield batch  # type: ignore[misc]
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        with contextlib.suppress(Exception):
            await items.aclose()  # type: ignore[attr-defined]
