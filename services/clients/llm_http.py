"""``LLMClient`` over HTTP: NDJSON stream in; closing the iterator closes the connection, which cancels."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import numpy as np

from services.clients.errors import check_ready, error_from_body, error_from_response, unavailable
from services.contracts.errors import ServiceUnavailableError
from services.contracts.llm import GenerateParams, GenerateRequest, LLMClient, LLMEvent, event_from_json, media_to_b64


class HttpLLMClient(LLMClient):
    def __init__(self, base_url: str, client: httpx.AsyncClient, timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = client
        self.timeout = httpx.Timeout(timeout_s, connect=5.0)

    async def generate(self, params: GenerateParams, media: np.ndarray | None) -> AsyncIterator[LLMEvent]:
        body = GenerateRequest(params=params, media=media_to_b64(media) if media is not None else None)
        request = self.client.build_request("POST", f"{self.base_url}/v1/generate", content=body.model_dump_json(),
                                            headers={"content-type": "application/json"}, timeout=self.timeout)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise unavailable("llm", exc) from exc
        try:
            if response.status_code != 200:
                await response.aread()
                raise error_from_response("llm", response)
            async for line in response.aiter_lines():
                if not line:
                    continue
                data = json.loads(line)
                if data.get("type") == "error":
                    raise error_from_body("llm", data)
                yield event_from_json(data)
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(f"llm stream broke: {exc}", code="llm_unavailable") from exc
        finally:
            await response.aclose()

    async def check_ready(self) -> None:
        await check_ready(self.client, self.base_url, "llm")
