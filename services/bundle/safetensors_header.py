"""Tensor names and shapes of a safetensors file, read from its header alone (no torch, no tensor bytes)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

_MAX_HEADER = 100 * 1024 * 1024


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER:
            raise ValueError(f"{path}: header of {length} bytes is not a safetensors header")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: unreadable safetensors header ({exc})") from exc
    return {name: tuple(meta["shape"]) for name, meta in header.items() if name != "__metadata__"}
