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

T = TypeVar("T")


class ClientWatch:
    """Watches a request whose body has been read, for its client's disconnect. (The server's stop is the turn's
    own business: ``ChatService.run``'s ``stopping``.)"""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.gone = False

    def present(self) -> bool:
        return not self.gone

    async def _disconnected(self) -> None:
        # Once the body is read, the server's next message is the disconnect (a pipelined request's bytes wait).
        while (await self._receive())["type"] != "http.disconnect":
            pass

    async def guard(self, work: Awaitable[T]) -> T:
        """``work``'s result; when the client goes first, ``work`` is cancelled and ``ClientDisconnect`` raised
        (answered 499, which no one receives: it keeps such requests apart in the metrics and the log)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            self.gone = True
            task.cancel()
            await asyncio.wait({task})  # its clean-up (the generation's and the jobs' cancelling) done
            raise ClientDisconnect()
        finally:
            watcher.cancel()
            task.cancel()
