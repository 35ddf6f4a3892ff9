"""The next item of a stream, unless the server stops first (``StreamHub.closing``): what a reply under way
waits on once the stop's grace is over, so that it ends with a word to its client instead of a cut connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


class Stopped(Exception):
    """The server stopped before the next item came."""


async def next_unless_stopping(items: AsyncIterator[T], stopping: asyncio.Event) -> T | None:
    """``items``' next item; None at its end; ``Stopped`` once ``stopping`` is set (the pending read cancelled,
    so that ``items`` can be closed after)."""
    if stopping.is_set():
        raise Stopped
    reading = asyncio.ensure_future(anext(items, None))
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({reading, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not reading.done():  # stopping, or the caller cancelled: the read stops before items is closed
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    if reading.cancelled():
        raise Stopped
    return reading.result()
