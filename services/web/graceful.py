"""A bounded graceful stop for the servers that stream replies (the gateway, embedded mode).

uvicorn stops on SIGTERM/SIGINT by closing its sockets and waiting, without a bound, for every connection to
finish its response: a reply streamed for minutes held the stop for as long (Ctrl-C at a 1024-token reply on a
CPU; a rollout that the orchestrator ends with SIGKILL, cutting the replies with no word to their clients). Here
the replies under way get ``grace_s`` to finish; then ``cut`` ends them the way the application chooses (the
gateway: an ``error`` event ``server_stopping``, then the end of each stream), and whatever is still open
``CUT_WAIT_S`` later is cancelled by uvicorn itself."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

log = logging.getLogger(__name__)

# After the cut: time for the readers to send their last events and for the connections to close.
CUT_WAIT_S = 5.0
STARTUP_FAILURE = 3  # uvicorn.run's exit status when the app cannot start


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, grace_s: float, cut: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self.grace_s, self.cut = grace_s, cut

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        async def cut_after_grace() -> None:
            await asyncio.sleep(self.grace_s)
            log.warning("the replies under way did not finish within %.0f s of the stop signal: ending them",
                        self.grace_s)
            await self.cut()

        cutter = asyncio.create_task(cut_after_grace())
        try:
            await super().shutdown(sockets)
        finally:
            cutter.cancel()


def serve(app: Any, grace_s: float, cut: Callable[[], Awaitable[None]], **config: Any) -> None:
    """``uvicorn.run(app, **config)`` with the bounded stop above."""
    server = DrainingServer(uvicorn.Config(app, timeout_graceful_shutdown=grace_s + CUT_WAIT_S, **config),
                            grace_s, cut)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
