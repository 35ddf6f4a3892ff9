"""Sound that libsndfile cannot read: the audio track of a container (a phone's ``.m4a``, a browser recording's
WebM/Opus, raw AAC), decoded by FFmpeg through PyAV. What a container holds decides what it is: a video stream
makes it a video; an audio stream alone, a sound."""

from __future__ import annotations

import io

import numpy as np
import torch

from services.contracts.errors import PayloadTooLargeError
from services.encoder.media import InputModality
from services.encoder.preprocess import MediaError, reason
from services.encoder.preprocess.decoding import decoded


def container_modality(data: bytes, name: str) -> InputModality:
    """"video" when the container has a video stream, "audio" when it has only sound (demuxed headers only)."""
    import av  # PyAV loads with the first container, not with the image and audio paths

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if container.streams.video:
                return "video"
            if container.streams.audio:
                return "audio"
    except Exception as exc:
        raise MediaError(f"{name}: not a readable video or audio file ({reason(exc)})", code="invalid_video",
                         param=name) from exc
    raise MediaError(f"{name}: no video or audio stream", code="invalid_video", param=name)


def decode_container_audio(data: bytes, name: str, max_seconds: float) -> tuple[torch.Tensor, int]:
    """(channels, samples) float32 and the sample rate of the first audio stream. The length is checked as it
    decodes (headers can lie): memory stays within ``max_seconds`` of sound."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as exc:
        raise MediaError(f"{name}: not a readable audio file ({reason(exc)})", code="invalid_audio",
                         param=name) from exc
    with container:
        if not container.streams.audio:
            raise MediaError(f"{name}: no audio stream", code="invalid_audio", param=name)
        stream = container.streams.audio[0]
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        if not rate or not channels:
            raise MediaError(f"{name}: audio stream without a sample rate or channels", code="invalid_audio",
                             param=name)
        limit = int(max_seconds * rate)
        # Planar float at the stream's own rate and layout: one (channels, n) array per frame.
        planar = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
        pieces: list[np.ndarray] = []
        total = 0
        for frame in decoded(container, stream, name, "audio", "invalid_audio"):
            for out in planar.resample(frame):
                pieces.append(out.to_ndarray())
                total += pieces[-1].shape[1]
            if total > limit:
                raise PayloadTooLargeError(f"{name}: audio is longer than the limit of {max_seconds:.0f} s",
                                           code="audio_too_long", param=name)
    if not total:
        raise MediaError(f"{name}: audio has no samples", code="invalid_audio", param=name)
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(pieces, axis=1), dtype=np.float32)), int(rate)
