"""The encoder boundary: media in, one LLM-space vector (or a few tokens) per segment out (safetensors on the wire)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

InputModality = Literal["image", "audio", "video"]
EMBEDDINGS_TENSOR = "embeddings"


@dataclass(frozen=True)
class MediaInput:
    """One uploaded file (``data``) or an object-store key (``key``); ``modality`` is checked against the bytes."""

    name: str
    data: bytes | None = None
    key: str | None = None
    modality: InputModality | None = None


@dataclass
class EncodeResult:
    # (segments, llm_hidden) float32: one vector per segment, the items of a segment summed as the reference does;
    # (segments, tokens, llm_hidden) for a bundle whose input projection makes several tokens per item (``group``).
    embeddings: np.ndarray
    modalities: list[InputModality] = field(default_factory=list)


class EncodeSpec(BaseModel):
    """The JSON part of an encode request: how items are declared and grouped."""

    modalities: dict[str, InputModality] = Field(default_factory=dict, description="file name -> declared modality")
    segments: list[list[str]] | None = Field(
        default=None, description="Groups of file names; each group becomes one summed vector (default: one per file)"
    )
    keys: list[str] = Field(default_factory=list, description="Object-store keys to encode instead of uploads")


class EncoderClient(ABC):
    @abstractmethod
    async def encode(self, items: list[MediaInput], segments: list[list[str]] | None = None) -> EncodeResult:
        """Encode ``items``; raises an ``InvalidRequestError`` subclass naming the file for bad media."""

    @abstractmethod
    async def check_ready(self) -> None:
        """Raise ``ServiceUnavailableError`` until the encoder can serve."""


SAFETENSORS_MEDIA_TYPE = "application/vnd.nextgpt.safetensors"


def pack_result(result: EncodeResult) -> bytes:
    """Safetensors bytes: tensor ``embeddings`` (segments, hidden), the modalities in the header metadata."""
    from safetensors.numpy import save

    return save({EMBEDDINGS_TENSOR: np.ascontiguousarray(result.embeddings, dtype=np.float32)},
                metadata={"modalities": ",".join(result.modalities)})


def unpack_result(blob: bytes) -> EncodeResult:
    from safetensors.numpy import load

    header_len = int.from_bytes(blob[:8], "little")
    metadata = json.loads(blob[8:8 + header_len]).get("__metadata__", {})
    modalities = [m for m in str(metadata.get("modalities", "")).split(",") if m]
    return EncodeResult(embeddings=load(blob)[EMBEDDINGS_TENSOR], modalities=modalities)  # type: ignore[arg-type]
