"""An encoder for gateway tests whose requests carry no media: any call to it is a test failure."""

from __future__ import annotations

from services.contracts.encoder import EncodeResult, EncoderClient, MediaInput


class NoEncoder(EncoderClient):
    async def encode(self, items: list[MediaInput], segments: list[list[str]] | None = None) -> EncodeResult:
        raise AssertionError("this test uploads nothing")

    async def check_ready(self) -> None:
        return None
