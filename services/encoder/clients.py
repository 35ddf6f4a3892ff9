"""``EncoderClient`` implementations: in-process (embedded mode) and HTTP (distributed mode)."""

from __future__ import annotations

from services.contracts.encoder import EncodeResult, EncoderClient, MediaInput
from services.encoder.serving import EncoderService


class InProcessEncoderClient(EncoderClient):
    def __init__(self, service: EncoderService) -> None:
        self.service = service

    async def encode(self, items: list[MediaInput], segments: list[list[str]] | None = None) -> EncodeResult:
        return await self.service.encode(items, segments)

    async def check_ready(self) -> None:
        return None
