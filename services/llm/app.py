"""``nextgpt llm serve``: POST /v1/generate streaming NDJSON, /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry

from services.contracts.errors import ErrorResponse, InvalidRequestError, NextGPTError, ServiceUnavailableError
from services.contracts.llm import GenerateRequest, LLMEvent, event_to_json, media_from_b64
from services.llm.serving import LLMService
from services.web.body_limit import BodyLimitMiddleware
from services.web.errors import install_error_handlers
from services.web.metrics import add_metrics_route

log = logging.getLogger(__name__)
NDJSON = "application/x-ndjson"


def build_llm_app(load_service: Callable[[], LLMService], registry: CollectorRegistry,
                  max_request_bytes: int = 64 * 1024 * 1024) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service, app.state.load_error = None, None

        async def load() -> None:
            try:
                app.state.service = await asyncio.to_thread(load_service)
                log.info("llm ready")
            except Exception as exc:
                log.exception("llm failed to load")
                app.state.load_error = str(exc)

        task = asyncio.create_task(load())
        try:
            yield
        finally:
            task.cancel()
            if app.state.service is not None:
                app.state.service.close()

    app = FastAPI(title="nextgpt llm", lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    install_error_handlers(app)

    def service_of(request: Request) -> LLMService:
        service: LLMService | None = request.app.state.service
        if service is None:
            raise ServiceUnavailableError(f"llm not ready: {request.app.state.load_error or 'model is loading'}",
                                          code="not_ready")
        return service

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> dict[str, object]:
        return {"status": "ready", "hidden_size": service_of(request).hidden_size}

    @app.post("/v1/generate", responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                                         503: {"model": ErrorResponse}})
    async def generate(body: GenerateRequest, request: Request) -> StreamingResponse:
        """Stream the reply as NDJSON events: ``delta``, ``signal`` (conditioning as base64 safetensors),
        ``done``; an ``error`` line if it fails after the stream started. Closing the connection cancels."""
        service = service_of(request)
        try:
            media = media_from_b64(body.media) if body.media else None
        except Exception as exc:
            raise InvalidRequestError(f"media is not base64 safetensors: {exc}", code="invalid_media",
                                      param="media") from exc
        events = service.generate(body.params, media)
        # Errors found before the first event (bounds, prompt too long, unknown LoRA) are plain 4xx answers.
        first = await anext(events)
        return StreamingResponse(_lines(first, events), media_type=NDJSON)

    add_metrics_route(app, registry)
    return app


async def _lines(first: LLMEvent, events: AsyncIterator[LLMEvent]) -> AsyncIterator[bytes]:
    try:
        yield _line(event_to_json(first))
        async for event in events:
            yield _line(event_to_json(event))
    except NextGPTError as exc:
        yield _line({"type": "error", **exc.to_response().model_dump()})
    except Exception:
        log.exception("generation failed")
        yield _line({"type": "error", "error": {"type": "internal_error", "code": "internal_error",
                                                "message": "generation failed", "param": None}})
    finally:
        await events.aclose()  # type: ignore[attr-defined]


def _line(data: dict[str, object]) -> bytes:
    return (json.dumps(data, separators=(",", ":")) + "\n").encode()
