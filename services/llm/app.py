"""``nextgpt llm serve``: POST /v1/generate streaming NDJSON, /healthz, /readyz, /metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry

from services.contracts.errors import ErrorResponse, InvalidRequestError, NextGPTError
from services.contracts.llm import GenerateRequest, LLMEvent, event_to_json, media_from_b64
from services.llm.serving import LLMService
from services.web.model_app import ModelApp

log = logging.getLogger(__name__)
NDJSON = "application/x-ndjson"


def build_llm_app(load_service: Callable[[], LLMService], registry: CollectorRegistry,
                  max_request_bytes: int = 64 * 1024 * 1024,
                  on_load_failure: Callable[[str], None] | None = None,
                  on_loaded: Callable[[], None] | None = None) -> FastAPI:
    host = ModelApp("llm", load_service, registry, max_request_bytes, stop=lambda s: s.close(),
                    on_load_failure=on_load_failure, on_loaded=on_loaded)
    app = host.app

    @app.post("/v1/generate", responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                                         503: {"model": ErrorResponse}})
    async def generate(body: GenerateRequest, request: Request) -> StreamingResponse:
        """Stream the reply as NDJSON events: ``accepted`` (the checks passed; the status is sent with it),
        ``delta``, ``signal`` (conditioning as base64 safetensors), ``done``; an ``error`` line if it fails after
        the stream started. Closing the connection cancels."""
        service = host.service(request)
        try:
            media = media_from_b64(body.media) if body.media else None
        except Exception as exc:
            raise InvalidRequestError(f"media is not base64 safetensors: {exc}", code="invalid_media",
                                      param="media") from exc
        events = service.generate(body.params, media)
        # Errors found before the first event, ``accepted`` (bounds, prompt too long, unknown LoRA, a full queue), are
        # plain 4xx / 503 answers.
        first = await anext(events)
        return StreamingResponse(_lines(first, events), media_type=NDJSON)

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
