"""A request answered once (a non-streamed chat turn) whose client goes away before the answer: nobody will read
it, so its work stops. Starlette leaves such a handler running to its end; a client that times out and retries
(the OpenAI SDK does, twice, by default) would otherwise leave each try's generation holding a batch slot and its
decode jobs drawing media for nobody, the load growing just when the server is already slow."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import ClientDisconnect
from starlette.types import Receive

from gateway.stopping import server_stopping

T = TypeVar("T")


class ClientWatch:
    """Watches a request whose body has been read, for its client's disconnect; and, given ``stopping`` (set when
    the server's stop grace is over), for the server's stop."""

    def __init__(self, receive: Receive, stopping: asyncio.Event | None = None) -> None:
        self._receive = receive
        self._stopping = stopping
        self.gone = False

    def present(self) -> bool:
        return not self.gone

    async def _disconnected(self) -> None:
        # Once the body is read, the server's next message is the disconnect (a pipelined request's bytes wait).
        while (await self._receive())["type"] != "http.disconnect":
            pass

    async def guard(self, work: Awaitable[T]) -> T:
        """``work``'s result; when the client goes first, ``work`` is cancelled and ``ClientDisconnect`` raised
        (answered 499, which no one receives: it keeps such requests apart in the metrics and the log); when the
        server stops first, ``work`` is cancelled and the client told to send it again (503 ``server_stopping``)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._disconnected())
        stop = asyncio.ensure_future(self._stopping.wait()) if self._stopping is not None else None
        try:
            await asyncio.wait({task, watcher} | ({stop} if stop else set()), return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            self.gone = watcher.done()
            task.cancel()
            await asyncio.wait({task})  # its clean-up (the generation's and the jobs' cancelling) done
            if self.gone:
                raise ClientDisconnect()
            raise server_stopping()
        finally:
            watcher.cancel()
            task.cancel()
            if stop is not None:
                stop.cancel()
