"""Decoding a container's stream through FFmpeg, as far as it goes: a damaged or truncated tail ends the stream
(what came before is used, as a player would), damage before anything decoded is the file's error."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from services.encoder.preprocess import MediaError, reason


def decoded(container: Any, stream: Any, name: str, what: str, code: str) -> Iterator[Any]:
    """The stream's frames; ``what`` and ``code`` name the file's kind in the error (e.g. "video", "invalid_video").
    Errors the caller raises while consuming a frame (a length bound, say) pass through untouched."""
    produced = False
    frames = container.decode(stream)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except Exception as exc:
            if not produced:
                raise MediaError(f"{name}: corrupt {what} ({reason(exc)})", code=code, param=name) from exc
            return
        produced = True
        yield frame
