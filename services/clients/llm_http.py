"""``LLMClient`` over HTTP: NDJSON stream in; closing the iterator closes the connection, which cancels.

This is the hottest internal hop (every chat turn, every token), so it runs on aiohttp rather than httpx: with its C
HTTP parser a request's send and its first line cost about half as much (``bench/gateway_overhead.py`` measures the
gateway's share of time to first token, of which this hop was the largest part)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import numpy as np

from services.clients.errors import check_ready_status, error_from_body, error_from_status, unavailable
from services.contracts.errors import ServiceUnavailableError
from services.contracts.llm import (
    Done, GenerateParams, GenerateRequest, LLMClient, LLMEvent, event_from_json, media_to_b64,
)
from services.web.keep_alive import CLIENT_IDLE_S

log = logging.getLogger(__name__)

# One NDJSON line is one event; a signal event carries its conditioning (a few hundred KB at real size). Anything
# far larger is a broken upstream, not an event to hold in memory.
MAX_LINE_BYTES = 64 * 1024 * 1024


class HttpLLMClient(LLMClient):
    """Owns one aiohttp session (made on first use, inside the running event loop); ``aclose`` closes it."""

    def __init__(self, base_url: str, timeout_s: float = 600.0, max_connections: int = 256,
                 accept_timeout_s: float = 30.0) -> None:
        """``timeout_s`` bounds each read of a reply (a turn may wait that long in the service's queue between its
        ``accepted`` and its first token); ``accept_timeout_s`` bounds the wait for the service's answer to the
        request (its status goes out with ``accepted``, once the request is checked and its prompt embedded)."""
        self.base_url = base_url.rstrip("/")
        # No total bound: a reply streams as long as it generates; each read and the connect are bounded.
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=timeout_s)
        self.accept_timeout_s = accept_timeout_s
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout,
                connector=aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=CLIENT_IDLE_S),
                auto_decompress=False)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def generate(self, params: GenerateParams, media: np.ndarray | None) -> AsyncIterator[LLMEvent]:
        body = GenerateRequest(params=params, media=media_to_b64(media) if media is not None else None)
        try:
            # A service that takes the connection and never answers (its process stopped, its loop blocked; a
            # pooled connection to a pod that hung) would otherwise hold the turn for the whole read bound.
            async with asyncio.timeout(self.accept_timeout_s):
                response = await self.session.post(f"{self.base_url}/v1/generate", data=body.model_dump_json(),
                                                   headers={"content-type": "application/json"})
        except TimeoutError as exc:
            raise ServiceUnavailableError(f"llm did not answer the request within {self.accept_timeout_s:g} s",
                                          code="llm_unavailable") from exc
        except aiohttp.ClientError as exc:
            raise unavailable("llm", exc) from exc
        finished = False
        try:
            if response.status != 200:
                raise error_from_status("llm", response.status, await response.read(), response.reason or "")
            ended = False
            async for line in _lines(response):
                data = json.loads(line.decode())  # str: json skips guessing the bytes' encoding
                if data.get("type") == "error":
                    raise error_from_body("llm", data)
                event = event_from_json(data)
                ended = isinstance(event, Done)
                yield event
            if not ended:
                # A body that ends in good order before the reply's end (a proxy between the services closing it
                # cleanly on an upstream reset): the turn fails as a broken stream does, not on a missing Done.
                raise ServiceUnavailableError("llm stream ended before the reply did; retry later",
                                              code="llm_unavailable")
            finished = True
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("llm stream broke: %s: %s", type(exc).__name__, exc)
            raise ServiceUnavailableError("llm stream broke; retry later", code="llm_unavailable") from exc
        finally:
            if finished:
                response.release()  # read to the end: the connection goes back to the pool
            else:
                response.close()  # left early: the service sees the disconnect and stops generating

    async def check_ready(self) -> None:
        """The service's /readyz, as the caller's readiness check: unreachable or not ready is a 503."""
        try:
            async with self.session.get(f"{self.base_url}/readyz", timeout=aiohttp.ClientTimeout(total=5.0)) as r:
                body = await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise unavailable("llm", exc) from exc
        check_ready_status("llm", r.status, body.decode("utf-8", "replace"))


async def _lines(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The body's non-empty lines as they arrive (aiohttp's own readline is capped at its read buffer's size,
    which a signal event's line may pass)."""
    buffer, scanned = bytearray(), 0
    async for chunk in response.content.iter_any():
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", scanned)) >= 0:
            if end > start:
                yield bytes(buffer[start:end])
            start = scanned = end + 1
        del buffer[:start]
        scanned = len(buffer)  # a long line is searched once, not again with every chunk
        if len(buffer) > MAX_LINE_BYTES:
            raise ServiceUnavailableError(f"llm sent a line over {MAX_LINE_BYTES} bytes", code="upstream_error")
    if buffer.strip():
        yield bytes(buffer)
