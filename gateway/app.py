"""The gateway's app factory: collaborators come in as arguments, nothing is loaded at import time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from services.web.errors import error_json, install_error_handlers
from services.contracts.errors import ErrorResponse, NextGPTError


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    owned_by: str = "nextgpt-serve"
    root: str | None = None
    modalities: list[str] = []


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


@dataclass
class GatewayState:
    models: list[ModelCard]
    # Each check raises when its dependency is not usable; /readyz runs them all.
    readiness_checks: dict[str, Callable[[], None]]


def build_app(state: GatewayState) -> FastAPI:
    app = FastAPI(title="nextgpt-serve", version="0.1.0",
                  responses={500: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    app.state.gateway = state
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> JSONResponse:
        failures: dict[str, str] = {}
        for name, check in request.app.state.gateway.readiness_checks.items():
            try:
                check()
            except NextGPTError as exc:
                failures[name] = exc.message
        if failures:
            return error_json(503, "service_unavailable", "not_ready",
                              "; ".join(f"{k}: {v}" for k, v in failures.items()))
        return JSONResponse({"status": "ready"})

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        return ModelList(data=request.app.state.gateway.models)

    return app
