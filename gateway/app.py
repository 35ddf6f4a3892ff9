"""The gateway's app factory: collaborators come in as arguments, nothing is loaded at import time."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

from gateway.media_fetch import MediaFetcher
from gateway.metrics import HttpMetricsMiddleware
from gateway.openapi import install_openapi
from gateway.routes import router
from gateway.state import GatewayState, ModelCard
from gateway.store_errors import STORE_DOWN, store_unavailable
from services.contracts.errors import ErrorResponse, NextGPTError, NotFoundError
from gateway.openai_serving import OpenAIServingChat
from services.web.body_limit import BodyLimitMiddleware
from services.web.errors import error_json, install_error_handlers, known_error_response
from services.web.hooks import call_hook
from services.web.metrics import add_metrics_route
from services.web.request_id import RequestIdMiddleware

log = logging.getLogger(__name__)

__all__ = ["GatewayState", "ModelCard", "build_app"]


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def build_app(state: GatewayState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for hook in state.on_startup:
            await call_hook(hook)
        yield
        await state.streams.close()  # producers first: they still use what the hooks close
        for hook in state.on_shutdown:
            await call_hook(hook)

    app = FastAPI(title="nextgpt-serve", version="0.1.0", lifespan=lifespan,
                  responses={500: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    app.state.gateway = state
    if state.openai is None and state.chat is not None and state.store is not None:
        g = state.settings
        fetcher = MediaFetcher(g.max_upload_bytes, g.media_url_timeout_s, g.media_url_max_redirects,
                               g.media_url_private) if g.media_url_fetch else None
        state.openai = OpenAIServingChat(state.chat, state.store, g,
                                         {card.id: (None if card.root is None else card.id) for card in state.models},
                                         fetcher, state.streams.closing)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.settings.max_upload_bytes,
                       timeout_s=state.settings.body_timeout_s)
    if state.settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=state.settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "last-event-id", "x-request-id"],
                           # What a browser client on another origin must read: the stream's id (to resume or
                           # cancel it), the conversation's (to go on after a stream that ended without done),
                           # and how long to wait after a 429/503.
                           expose_headers=["x-request-id", "x-stream-id", "x-conversation-id", "retry-after"])
    app.add_middleware(RequestIdMiddleware)
    if state.metrics is not None:
        app.add_middleware(HttpMetricsMiddleware, metrics=state.metrics)
    install_error_handlers(app)
    _install_redis_unavailable(app)
    if state.chat is not None:
        app.include_router(router)
    if state.registry is not None:
        add_metrics_route(app, state.registry)
    install_openapi(app)

    playground = (files("gateway") / "static" / "playground.html").read_text()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        """The web playground: chat, uploads, media shown as their jobs complete."""
        return HTMLResponse(playground, headers={"cache-control": "no-cache"})

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.api_route("/readyz", methods=["GET", "HEAD"], responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> JSONResponse:
        state = request.app.state.gateway
        checks = {**state.readiness_checks, **state.advisory_checks}
        results = await asyncio.gather(*(_probe(check) for check in checks.values()))
        failures = {name: problem for name, problem in zip(checks, results) if problem}
        blocking = {k: v for k, v in failures.items() if k in state.readiness_checks}
        if blocking:
            return error_json(503, "service_unavailable", "not_ready",
                              "; ".join(f"{k}: {v}" for k, v in failures.items()))
        degraded = {k: v for k, v in failures.items() if k in state.advisory_checks}
        return JSONResponse({"status": "degraded", "degraded": degraded} if degraded else {"status": "ready"})

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        return ModelList(data=request.app.state.gateway.models)

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def model(model_id: str, request: Request) -> ModelCard:
        """One entry of ``/v1/models`` (OpenAI's ``models.retrieve``, which clients use to check a model name)."""
        for card in request.app.state.gateway.models:
            if card.id == model_id:
                return card
        raise NotFoundError(f"unknown model {model_id!r}; see GET /v1/models", code="model_not_found",
                            param="model")

    return app


# A probe answers within this bound, whatever a dependency does: a check still waiting (a client riding out a Redis
# restart with its retry backoff, say) is reported as not ready rather than holding the probe.
PROBE_TIMEOUT_S = 2.0


async def _probe(check: Any) -> str | None:
    """None when ``check`` passes within PROBE_TIMEOUT_S; else what is wrong. Sync checks run in a thread."""
    async def run() -> None:
        if inspect.iscoroutinefunction(check):
            await check()
        else:
            result = await asyncio.to_thread(check)
            if inspect.isawaitable(result):
                await result

    try:
        await asyncio.wait_for(run(), PROBE_TIMEOUT_S)
    except NextGPTError as exc:
        return exc.message
    except TimeoutError:
        return f"no answer within {PROBE_TIMEOUT_S:.0f} s"
    return None


def _install_redis_unavailable(app: FastAPI) -> None:
    """Redis unreachable, or holding a command past its socket timeout: a 503 to retry, in the shared shape, not
    a 500 (``gateway.store_errors``)."""
    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        return known_error_response(store_unavailable(exc))

    for kind in STORE_DOWN:
        app.add_exception_handler(kind, unavailable)
