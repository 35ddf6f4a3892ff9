"""uvicorn's HTTP protocol (httptools) with bounds on a request's head: its size in bytes, its number of lines
(431), and the time a client may take to send it (408). uvicorn bounds none of these: a 64 MB ``Authorization``
header cost 237 MB and 6 s, 200,000 header lines were accepted, and a client sending headers at one byte a second
held its connection as long as it liked. Bodies are bounded at the ASGI level (``body_limit``)."""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD_END = b"\r\n\r\n"


def _raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"type": "invalid_request_error", "code": code, "message": message,
                                 "param": None}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    return head + body


class BoundedHeadProtocol(HttpToolsProtocol):
    max_head_bytes = 64 * 1024
    max_head_lines = 200
    head_timeout_s = 30.0

    def connection_made(self, transport: Any) -> None:  # noqa: ANN401 - uvicorn's own signature
        super().connection_made(transport)
        self._next_request()

    def _next_request(self) -> None:
        self._head_bytes, self._head_lines, self._tail = 0, 0, b""
        self._cycle_before = getattr(self, "cycle", None)
        self._timer: Any = None

    def _in_head(self) -> bool:
        return getattr(self, "cycle", None) is self._cycle_before

    def data_received(self, data: bytes) -> None:
        if self._in_head():
            if self._timer is None:
                self._timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)
            seen = self._tail + data
            end = seen.find(_HEAD_END)
            head = data if end < 0 else data[:max(0, end + len(_HEAD_END) - len(self._tail))]
            self._tail = seen[-(len(_HEAD_END) - 1):]
            self._head_bytes += len(head)
            self._head_lines += head.count(b"\n")
            if self._head_bytes > self.max_head_bytes or self._head_lines > self.max_head_lines:
                self._refuse(431, "Request Header Fields Too Large", "headers_too_large",
                             f"request headers exceed {self.max_head_bytes} bytes or {self.max_head_lines} lines")
                return
        super().data_received(data)
        if not self._in_head() and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_too_slow(self) -> None:
        if self._in_head() and not self.transport.is_closing():
            self._refuse(408, "Request Timeout", "request_timeout",
                         f"request headers not received within {self.head_timeout_s:.0f} s")

    def _refuse(self, status: int, reason: str, code: str, message: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.logger.info("refused a request from %s: %s", self.client, message)
        if not self.transport.is_closing():
            self.transport.write(_raw_response(status, reason, code, message))
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._next_request()  # a keep-alive connection's next request gets the same bounds

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)


def bounded_protocol(max_head_bytes: int, max_head_lines: int, head_timeout_s: float) -> type[BoundedHeadProtocol]:
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,), {
        "max_head_bytes": max_head_bytes, "max_head_lines": max_head_lines, "head_timeout_s": head_timeout_s})
