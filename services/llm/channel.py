"""Events from a generation thread to the event loop, cheaply under load.

One wake-up of the loop per burst, not per event (each ``call_soon_threadsafe`` writes the loop's self-pipe), and
consecutive text deltas that piled up while the reader was busy go out as one: a client sees the same text in
fewer, larger pieces exactly when the server is busiest, and every hop after this one (gateway, event log, SSE)
does proportionally less work.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from services.contracts.llm import TextDelta

_END = object()


class EventChannel:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[object] = []
        self._woken = asyncio.Event()
        self._wake_pending = False

    def put(self, item: object) -> None:
        """From any thread."""
        with self._lock:
            self._items.append(item)
            if self._wake_pending:
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self._woken.set)

    def end(self) -> None:
        self.put(_END)

    async def items(self) -> AsyncIterator[object]:
        """Everything put, in order, with runs of text deltas merged; ends after ``end()``."""
        while True:
            await self._woken.wait()
            self._woken.clear()
            with self._lock:
                batch, self._items, self._wake_pending = self._items, [], False
            for item in _merged(batch):
                if item is _END:
                    return
                yield item


def _merged(batch: list[object]) -> list[object]:
    out: list[object] = []
    for item in batch:
        if isinstance(item, TextDelta) and out and isinstance(out[-1], TextDelta):
            out[-1] = TextDelta(out[-1].text + item.text)
        else:
            out.append(item)
    return out
