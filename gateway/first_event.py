"""A streamed turn answers with a status only once: errors the LLM finds before it takes the request (its bounds
on the prompt, an unknown adapter, a full queue) must be that status (4xx, 503), not an ``error`` event inside a
stream already answered 200, or clients and load balancers cannot tell a bad request or a retry from a reply.
The turn's first event is ``ReplyAccepted`` (the LLM's ``Accepted``, sent before the prefill), so the answer's
start still overlaps the reply's first token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway.disconnect import ClientWatch
from gateway.turn_events import TurnEvent
from services.contracts.errors import ServiceUnavailableError


class FirstEvent:
    """Fetches the turn's first event at once (in its own task, so the stream's set-up overlaps it) and hands
    out all events, the first included, to whoever streams them. (An LLM that sends no ``Accepted`` makes the
    first token the first event: the answer then waits for it.)"""

    def __init__(self, events: AsyncIterator[TurnEvent]) -> None:
        self._events = events
        self._iterating = False
        self._first: asyncio.Future[TurnEvent] = asyncio.ensure_future(anext(events))

    async def check(self, client: ClientWatch) -> None:
        """Wait for the first event; raise what came instead of it. A client gone meanwhile ends the turn at once
        (``ClientDisconnect``): it never got the answer's start, so nobody can read or resume what the turn makes."""
        try:
            await client.guard(self._first)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this request itself is being cancelled
            # The turn was stopped from elsewhere before it began (the server closing its streams): an answer
            # to retry, not a 500.
            raise ServiceUnavailableError("the turn was stopped before its answer began; retry",
                                          code="turn_stopped") from None

    async def events(self) -> AsyncIterator[TurnEvent]:
        self._iterating = True
        try:
            yield await self._first
            async for event in self._events:
                yield event
        finally:
            await self._close()

    async def close(self) -> None:
        """Ends a turn whose ``events`` never started (its stream could not be set up): its generation and decode
        jobs. Once started, ``events`` is what closes it, from the task iterating it."""
        if not self._iterating:
            await self._close()

    async def _close(self) -> None:
        if not self._first.done():
            self._first.cancel()
            await asyncio.wait({self._first})  # the generator is running until the cancel has gone through it
        elif not self._first.cancelled():
            self._first.exception()  # seen: a refusal nobody will be told of is not "never retrieved" in the log
        await self._events.aclose()  # type: ignore[attr-defined]
