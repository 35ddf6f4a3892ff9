"""``EncoderClient`` over HTTP: multipart upload in, safetensors out."""

from __future__ import annotations

import httpx
from services.clients.errors import check_ready, error_from_response, unavailable
from services.contracts.encoder import EncodeResult, EncoderClient, EncodeSpec, MediaInput, unpack_result
from services.contracts.errors import InvalidRequestError


class HttpEncoderClient(EncoderClient):
    def __init__(self, base_url: str, client: httpx.AsyncClient, timeout_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = client
        self.timeout = httpx.Timeout(timeout_s, connect=5.0)

    async def encode(self, items: list[MediaInput], segments: list[list[str]] | None = None) -> EncodeResult:
        if any(item.data is None for item in items):
            if not all(item.key for item in items):
                raise InvalidRequestError("mix of uploads and keys is not supported", code="invalid_request")
            spec = EncodeSpec(keys=[i.key for i in items if i.key], segments=segments,
                              modalities={i.name: i.modality for i in items if i.modality})
            kwargs: dict[str, object] = {"content": spec.model_dump_json(),
                                         "headers": {"content-type": "application/json"}}
        else:
            spec = EncodeSpec(segments=segments, modalities={i.name: i.modality for i in items if i.modality})
            files = [("files", (i.name, i.data or b"", "application/octet-stream")) for i in items]
            kwargs = {"files": files, "data": {"request": spec.model_dump_json()}}
        try:
            response = await self.client.post(f"{self.base_url}/v1/encode", timeout=self.timeout,
                                              **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise unavailable("encoder", exc) from exc
        if response.status_code != 200:
            raise error_from_response("encoder", response)
        return unpack_result(response.content)

    async def check_ready(self) -> None:
        await check_ready(self.client, self.base_url, "encoder")
