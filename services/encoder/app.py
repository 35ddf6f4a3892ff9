"""``nextgpt encoder serve``: POST /v1/encode, /healthz, /readyz, /metrics."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from services.contracts.encoder import SAFETENSORS_MEDIA_TYPE, EncodeSpec, MediaInput, pack_result
from services.contracts.errors import ErrorResponse, InvalidRequestError, PayloadTooLargeError
from services.encoder.serving import EncoderService
from services.web.forms import read_form
from services.web.model_app import ModelApp

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 503)}


def build_encoder_app(load_service: Callable[[], EncoderService], registry: CollectorRegistry,
                      max_request_bytes: int, on_load_failure: Callable[[str], None] | None = None,
                      on_loaded: Callable[[], None] | None = None) -> FastAPI:
    """``load_service`` runs in a thread at start-up (model loading); /readyz answers 503 until it is done."""
    host = ModelApp("encoder", load_service, registry, max_request_bytes, start=lambda s: s.start(),
                    stop=lambda s: s.stop(), on_load_failure=on_load_failure, on_loaded=on_loaded)
    app = host.app

    @app.post("/v1/encode", responses=_ERRORS)
    async def encode(request: Request) -> Response:
        """Multipart ``files`` (+ optional JSON part ``request``: modalities, segments), or a JSON body with
        object-store ``keys``. Answers safetensors bytes, or JSON with ``Accept: application/json``."""
        service = host.service(request)
        items, spec = await _read_request(request, service.limits.max_files)
        result = await service.encode(items, spec.segments)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"embeddings": result.embeddings.tolist(), "modalities": result.modalities,
                                 "hidden_size": int(result.embeddings.shape[1])})
        return Response(pack_result(result), media_type=SAFETENSORS_MEDIA_TYPE)

    return app


def _spec(raw: str | bytes | None) -> EncodeSpec:
    if raw is None:
        return EncodeSpec()
    try:
        return EncodeSpec.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequestError(f"invalid request part: {exc.errors()[0]['msg']}", code="invalid_request",
                                  param="request") from exc


async def _read_request(request: Request, max_files: int) -> tuple[list[MediaInput], EncodeSpec]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        spec = _spec(await request.body())
        if len(spec.keys) > max_files:
            raise PayloadTooLargeError(f"{len(spec.keys)} keys exceed the limit of {max_files}", code="too_many_files")
        return [MediaInput(name=k, key=k, modality=spec.modalities.get(k)) for k in spec.keys], spec
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequestError("send multipart/form-data (files) or application/json (keys)",
                                  code="unsupported_content_type")
    form = await read_form(request, max_files=max_files, max_fields=16, setting="NEXTGPT_ENCODER__MAX_FILES",
                           too_many=PayloadTooLargeError)
    try:
        raw = form.get("request")
        spec = _spec(await raw.read() if isinstance(raw, UploadFile) else raw)
        items = []
        for upload in form.getlist("files"):
            if not isinstance(upload, UploadFile):
                raise InvalidRequestError("'files' parts must be files", code="invalid_multipart", param="files")
            name = upload.filename or f"file{len(items)}"
            items.append(MediaInput(name=name, data=await upload.read(), modality=spec.modalities.get(name)))
        return items, spec
    finally:
        await form.close()

