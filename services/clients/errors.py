"""Turn a service's error response back into the typed error it was, so callers handle local and remote alike."""

from __future__ import annotations

import json
import logging

import httpx

from services.contracts.errors import (
    AuthenticationError,
    InvalidRequestError,
    NextGPTError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnsupportedMediaError,
)

log = logging.getLogger(__name__)

_BY_STATUS: dict[int, type[NextGPTError]] = {
    400: InvalidRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    413: PayloadTooLargeError, 415: UnsupportedMediaError, 422: InvalidRequestError, 429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_from_response(service: str, response: httpx.Response) -> NextGPTError:
    return error_from_status(service, response.status_code, response.content, response.reason_phrase)


def error_from_status(service: str, status: int, body: bytes, reason: str = "") -> NextGPTError:
    """A service's error reply (status and body, whichever HTTP client read them) as the typed error it was."""
    try:
        info = json.loads(body)["error"]
        message, code, param = str(info["message"]), str(info["code"]), info.get("param")
    except (ValueError, KeyError, TypeError):
        message, code, param = body[:500].decode("utf-8", "replace") or reason, "upstream_error", None
    cls = _BY_STATUS.get(status)
    if cls is None:
        # A 5xx from a service is an outage of that service as far as the caller is concerned.
        return ServiceUnavailableError(f"{service} failed ({status}): {message}", code="upstream_error")
    return cls(message, code=code, param=param)


def unavailable(service: str, exc: Exception) -> ServiceUnavailableError:
    """The answer's words name the service and the kind of failure; where it was (its host and port: in Kubernetes
    the service's DNS name) and what the socket said go to the log only, as the answer may reach a public client."""
    said = str(exc)  # httpx's timeouts say nothing more than their type
    log.warning("%s unreachable: %s%s", service, type(exc).__name__, f": {said}" if said else "")
    return ServiceUnavailableError(f"{service} is unreachable ({_kind(exc)}); retry later",
                                   code=f"{service}_unavailable")


def _kind(exc: Exception) -> str:
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return "timed out"
    # aiohttp's ClientConnectorError (and its DNS and certificate subclasses): no connection was made
    refused = isinstance(exc, (ConnectionRefusedError, httpx.ConnectError))
    if refused or type(exc).__name__.startswith("ClientConnector"):
        return "cannot connect"
    return "connection lost"


def error_from_body(service: str, data: dict[str, object]) -> NextGPTError:
    """An ``{"type": "error", "error": {...}}`` line from a stream that had already started."""
    info = data.get("error")
    if not isinstance(info, dict):
        return ServiceUnavailableError(f"{service} stream failed", code="upstream_error")
    by_type = {cls.error_type: cls for cls in _BY_STATUS.values()}
    cls = by_type.get(str(info.get("type")))
    message, code = str(info.get("message", "")), str(info.get("code", "upstream_error"))
    if cls is None:
        return ServiceUnavailableError(f"{service} failed: {message}", code="upstream_error")
    return cls(message, code=code, param=info.get("param"))  # type: ignore[arg-type]


async def check_ready(client: httpx.AsyncClient, base_url: str, service: str) -> None:
    """A service's /readyz, as the caller's readiness check: unreachable or not ready is a 503."""
    try:
        response = await client.get(f"{base_url}/readyz", timeout=5.0)
    except httpx.HTTPError as exc:
        raise unavailable(service, exc) from exc
    check_ready_status(service, response.status_code, response.text)


def check_ready_status(service: str, status: int, text: str) -> None:
    """A service's /readyz answer, whichever HTTP client read it: anything but 200 is not ready (a 503 here)."""
    if status != 200:
        raise ServiceUnavailableError(f"{service} not ready: {text[:300]}", code=f"{service}_not_ready")
