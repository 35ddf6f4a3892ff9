"""What a file really is, judged from its bytes: a ``.png`` holding a WAV is an audio file, not an image."""

from __future__ import annotations

from typing import Literal

InputModality = Literal["image", "audio", "video"]

_IMAGE = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
_AUDIO = (b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


def sniff(data: bytes) -> InputModality | None:
    head = data[:16]
    if head.startswith(_IMAGE) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio"
    if head.startswith(_AUDIO):
        return "audio"
    if head[4:8] == b"ftyp" or head.startswith(b"\x1a\x45\xdf\xa3") or (head[:4] == b"RIFF" and head[8:12] == b"AVI "):
        return "video"
    return None
