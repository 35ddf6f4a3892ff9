"""Refuse request bodies over a bound while they stream in, before they are parsed or spooled to disk, and bodies
that take longer than a bound to arrive (a client trickling its body holds a connection and a task)."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes, self.timeout_s = max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0
        started = False
        complete = False
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal seen, complete
            if complete or deadline is None:  # after the body, receive() waits for a disconnect: no bound
                message = await receive()
            else:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        message = await receive()
                except TimeoutError:
                    raise _TooSlow from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)
        except _TooSlow:
            if not started:
                await self._reject(send, 408, "request_timeout",
                                   f"request body not received within {self.timeout_s:.0f} s")

    async def _reject(self, send: Send, status: int = 413, code: str = "request_too_large",
                      message: str | None = None) -> None:
        body = json.dumps({"error": {"type": "payload_too_large" if status == 413 else "invalid_request_error",
                                     "code": code, "message": message or f"request body exceeds {self.max_bytes} bytes",
                                     "param": None}})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body.encode()})
