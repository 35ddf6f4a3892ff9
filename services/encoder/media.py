"""What a file really is, judged from its bytes: a ``.png`` holding a WAV is an audio file, not an image."""

from __future__ import annotations

from typing import Literal

InputModality = Literal["image", "audio", "video"]

_IMAGE = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
# ISO-BMFF files (an "ftyp" box first, as MP4) whose major brand is a HEIF still image: a phone's HEIC photo, an
# AVIF. Read as one picture (Pillow; pillow-heif for HEIC), not as a one-frame clip: FFmpeg would decode only the
# first tile of an iPhone photo's grid, and the model would get a clip of a still.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"})
_AUDIO = (b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2",
          b"\xff\xf1", b"\xff\xf9")  # the last two: raw AAC (ADTS), as phones and encoders write it


def sniff(data: bytes) -> InputModality | None:
    """The modality the bytes' signature says; a container (MP4, WebM/Matroska, AVI) is "video" here: what it
    holds decides (``container_modality``), an ``.m4a`` is an MP4 with sound alone."""
    head = data[:16]
    if head.startswith(_IMAGE) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or is_heif(data):
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio"
    if head.startswith(_AUDIO):
        return "audio"
    if is_container(data):
        return "video"
    return None


def is_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def is_container(data: bytes) -> bool:
    head = data[:16]
    return (head[4:8] == b"ftyp" and not is_heif(data)) or head.startswith(b"\x1a\x45\xdf\xa3") or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
