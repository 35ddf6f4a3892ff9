"""Every error leaves an HTTP surface in the shared shape ``{"error": {type, code, message, param}}``."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from services.contracts.errors import ErrorInfo, ErrorResponse, NextGPTError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "payload_too_large",
          415: "unsupported_media_type", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}


def error_json(status: int, type_: str, code: str, message: str, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(type=type_, code=code, message=message, param=param))
    return JSONResponse(status_code=status, content=body.model_dump())


# nginx's "client closed request": never received by anyone, it keeps such requests apart from server errors in the
# metrics and the access log.
CLIENT_CLOSED_REQUEST = 499


def known_error_response(exc: NextGPTError) -> JSONResponse:
    """Our error in the shared shape, with its status and, when it has one, its ``Retry-After``."""
    # Whole seconds (RFC 9110), at least one: clients (the OpenAI SDK among them) wait that long, then retry.
    headers = {"retry-after": str(max(1, math.ceil(exc.retry_after_s)))} if exc.retry_after_s else None
    return JSONResponse(status_code=exc.status_code, content=exc.to_response().model_dump(), headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> Response:
        # A client going away mid-upload, or before a long answer, is normal traffic, not a fault of ours.
        log.info("client closed the connection before its answer: %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(NextGPTError)
    async def _known(_: Request, exc: NextGPTError) -> JSONResponse:
        if exc.status_code >= 500:
            # 503 is an expected state (loading, overloaded, a dependency down); other 5xx are faults.
            log.log(logging.INFO if exc.status_code == 503 else logging.ERROR, "request failed: %s", exc.message)
        return known_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_json(400, "invalid_request_error", "invalid_request", str(first.get("msg")), param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = _TYPES.get(exc.status_code, "internal_error" if exc.status_code >= 500 else "invalid_request_error")
        return error_json(exc.status_code, type_, type_ if exc.status_code != 404 else "not_found", str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Details stay in the log; the client gets the shape and no internals.
        log.exception("unhandled error")
        return error_json(500, "internal_error", "internal_error", "internal server error")
