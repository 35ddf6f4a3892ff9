"""The shape every model service shares: load the model in a thread at start-up (``/readyz`` answers 503 until
it is loaded, or with the load error), then serve; stop it at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, Protocol, TypeVar

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry

from services.contracts.errors import ErrorResponse, ServiceUnavailableError
from services.web.body_limit import BodyLimitMiddleware
from services.web.errors import install_error_handlers
from services.web.hooks import call_hook
from services.web.metrics import add_metrics_route
from services.web.request_id import RequestIdMiddleware

log = logging.getLogger(__name__)


class ModelService(Protocol):
    hidden_size: int


S = TypeVar("S", bound=ModelService)


class ModelApp(Generic[S]):
    def __init__(self, name: str, load: Callable[[], S], registry: CollectorRegistry, max_request_bytes: int,
                 start: Callable[[S], Any] | None = None, stop: Callable[[S], Any] | None = None,
                 on_load_failure: Callable[[str], None] | None = None,
                 on_loaded: Callable[[], None] | None = None) -> None:
        """``on_load_failure(reason)``: the process entry point's way to stop the server (a service that cannot
        load never becomes ready; exiting lets its supervisor restart it). Liveness fails meanwhile either way.
        ``on_loaded()``: called once the service is loaded and started, before it is ready (the entry point's
        ``freeze_loaded``)."""
        self.name = name
        self.on_load_failure, self.on_loaded = on_load_failure, on_loaded

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            app.state.service, app.state.load_error = None, None
            task = asyncio.create_task(self._load(app, load, start))
            try:
                yield
            finally:
                task.cancel()
                if app.state.service is not None and stop is not None:
                    await call_hook(stop, app.state.service)

        self.app = FastAPI(title=f"nextgpt {name}", lifespan=lifespan)
        self.app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
        self.app.add_middleware(RequestIdMiddleware)
        install_error_handlers(self.app)
        add_metrics_route(self.app, registry)

        @self.app.get("/healthz", responses={503: {"model": ErrorResponse}})
        async def healthz(request: Request) -> dict[str, str]:
            if request.app.state.load_error is not None:
                raise ServiceUnavailableError(f"{self.name} failed to load: {request.app.state.load_error}",
                                              code="load_failed")
            return {"status": "ok"}

        @self.app.get("/readyz", responses={503: {"model": ErrorResponse}})
        async def readyz(request: Request) -> dict[str, object]:
            service = self.service(request)
            check = getattr(service, "check_ready", None)  # a service that can stop serving once loaded says so
            if check is not None:
                check()
            return {"status": "ready", "hidden_size": service.hidden_size}

    async def _load(self, app: FastAPI, load: Callable[[], S], start: Callable[[S], Any] | None) -> None:
        try:
            service = await asyncio.to_thread(load)
            if start is not None:
                await call_hook(start, service)
            if self.on_loaded is not None:
                self.on_loaded()
            app.state.service = service
            log.info("%s ready", self.name)
        except Exception as exc:
            log.exception("%s failed to load", self.name)
            app.state.load_error = str(exc)
            if self.on_load_failure is not None:
                self.on_load_failure(str(exc))

    def service(self, request: Request) -> S:
        service: S | None = request.app.state.service
        if service is None:
            detail = request.app.state.load_error or "model is loading"
            raise ServiceUnavailableError(f"{self.name} not ready: {detail}", code="not_ready")
        return service
