"""Video through the vision branch: 5 clips of 2 s, 2 frames each (first and last of the clip), short side
scaled to 224 (bilinear), CLIP mean/std, 3 spatial crops -> (15, 3, 2, 224, 224)."""

from __future__ import annotations

import io
import math
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from services.contracts.errors import PayloadTooLargeError
from services.encoder.preprocess import MediaError, reason
from services.encoder.preprocess.clips import clip_windows
from services.encoder.preprocess.decoding import decoded as decoded_frames
from services.encoder.preprocess.image import CLIP_MEAN, CLIP_STD, SIZE, on_white

if TYPE_CHECKING:
    import av

CLIP_SECONDS = 2
CLIPS = 5
FRAMES_PER_CLIP = 2
CROPS = 3


def _open(data: bytes, name: str) -> av.container.InputContainer:
    import av  # PyAV (with its FFmpeg) loads with the first video, not with the image and audio paths

    try:
        return av.open(io.BytesIO(data), mode="r")
    except Exception as exc:
        raise MediaError(f"{name}: not a readable video ({reason(exc)})", code="invalid_video",
                         param=name) from exc


def _checked_stream(container: av.container.InputContainer, name: str, max_seconds: float,
                    max_pixels: int) -> tuple[av.video.stream.VideoStream, float | None]:
    if not container.streams.video:
        raise MediaError(f"{name}: no video stream", code="invalid_video", param=name)
    stream = container.streams.video[0]
    if stream.codec_context.width * stream.codec_context.height > max_pixels:
        raise PayloadTooLargeError(
            f"{name}: {stream.codec_context.width}x{stream.codec_context.height} frames exceed the limit",
            code="video_too_large", param=name)
    declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    if declared is not None and declared > max_seconds:
        raise PayloadTooLargeError(f"{name}: {declared:.1f} s of video exceeds the limit of {max_seconds:.0f} s",
                                   code="video_too_long", param=name)
    return stream, declared


def _too_long(name: str, max_seconds: float) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"{name}: video is longer than the limit of {max_seconds:.0f} s",
                                code="video_too_long", param=name)


def packet_times(data: bytes, name: str, max_seconds: float, max_pixels: int) -> tuple[list[float], float | None]:
    """Presentation times of the first video stream's frames, from its packets (demuxed, not decoded)."""
    with _open(data, name) as container:
        stream, declared = _checked_stream(container, name, max_seconds, max_pixels)
        times: list[float] = []
        try:
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                times.append(float(packet.pts * packet.time_base))
                if times[-1] > max_seconds:  # headers can lie about the duration; timestamps cannot
                    raise _too_long(name, max_seconds)
        except PayloadTooLargeError:
            raise
        except Exception as exc:
            if not times:
                raise MediaError(f"{name}: corrupt video ({reason(exc)})", code="invalid_video",
                                 param=name) from exc
    return sorted(times), declared


def decode_frames(data: bytes, name: str, max_seconds: float, max_pixels: int,
                  wanted: set[float]) -> tuple[dict[float, np.ndarray], list[float]]:
    """The frames presented at ``wanted`` times, and every decoded frame's time. Only wanted frames are kept:
    a long or large video costs one frame's memory beyond the few the sampling needs."""
    kept: dict[float, np.ndarray] = {}
    decoded: list[float] = []
    with _open(data, name) as container:
        stream, _ = _checked_stream(container, name, max_seconds, max_pixels)
        for frame in decoded_frames(container, stream, name, "video", "invalid_video"):
            if frame.time is None:
                continue
            if frame.time > max_seconds:
                raise _too_long(name, max_seconds)
            decoded.append(float(frame.time))
            if decoded[-1] in wanted:
                kept[decoded[-1]] = _upright(frame)
    if not decoded:
        raise MediaError(f"{name}: video has no frames", code="invalid_video", param=name)
    return kept, sorted(decoded)


def _upright(frame: av.VideoFrame) -> np.ndarray:
    """The frame as a player shows it. A phone films a portrait clip as landscape frames with a display matrix
    saying how to turn them (FFmpeg's command line turns them; decoding does not): a clip on its side would reach
    the model with its motion turned too, "moving up" read as "moving left"."""
    pixels = _on_white(frame)
    turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise quarter turns, as np.rot90 counts them
    return np.ascontiguousarray(np.rot90(pixels, k=turns)) if turns else pixels


def _on_white(frame: av.VideoFrame) -> np.ndarray:
    """RGB with what is transparent lying on white, as a picture's (``image.on_white``): an animated GIF or PNG (or
    a clip with an alpha plane) on a transparent background was seen on black, or on the colour stored under it."""
    fmt = frame.format
    if not fmt.has_palette and not any(c.is_alpha for c in fmt.components):
        return frame.to_ndarray(format="rgb24")
    return np.asarray(on_white(Image.fromarray(frame.to_ndarray(format="rgba"), "RGBA")))


def _duration(times: list[float], declared: float | None) -> float:
    step = times[1] - times[0] if len(times) > 1 else 0.0
    return declared if declared else times[-1] + step


def short_side_scale(clip: torch.Tensor, size: int) -> torch.Tensor:
    """(C, T, H, W) -> short side ``size``; the long side is floored, as pytorchvideo does."""
    _, _, h, w = clip.shape
    if w < h:
        new_h, new_w = int(math.floor(h / w * size)), size
    else:
        new_h, new_w = size, int(math.floor(w / h * size))
    return F.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)


def spatial_crops(clip: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Three crops along the long side: start, centre, end (ImageBind's SpatialCrop with 3 crops)."""
    _, _, h, w = clip.shape
    crops = []
    for index in range(CROPS):
        y = int(math.ceil((h - size) / 2))
        x = int(math.ceil((w - size) / 2))
        if h > w:
            y = (0, y, h - size)[index]
        else:
            x = (0, x, w - size)[index]
        crops.append(clip[:, :, y:y + size, x:x + size])
    return crops


def clip_times(times: list[float], start: Fraction, end: Fraction) -> list[float]:
    """The times of the frames presented in [start, end), subsampled uniformly to FRAMES_PER_CLIP."""
    inside = [t for t in times if start <= Fraction(t) < end]
    if not inside:
        # A clip between two sparse frames: take the nearest earlier frame, so every clip has content.
        earlier = [t for t in times if Fraction(t) < end]
        inside = [earlier[-1] if earlier else times[0]]
    picks = torch.linspace(0, len(inside) - 1, FRAMES_PER_CLIP).long().tolist()
    return [inside[i] for i in picks]


def preprocess_video(data: bytes, name: str, max_seconds: float, max_pixels: int) -> torch.Tensor:
    times, declared = packet_times(data, name, max_seconds, max_pixels)
    if not times:
        raise MediaError(f"{name}: video has no frames", code="invalid_video", param=name)
    windows = clip_windows(_duration(times, declared), CLIP_SECONDS, CLIPS)
    picks = [clip_times(times, start, end) for start, end in windows]
    frames, decoded = decode_frames(data, name, max_seconds, max_pixels, {t for p in picks for t in p})
    if any(t not in frames for p in picks for t in p):
        # The packets promised frames the decoder did not deliver (a corrupt tail): sample what it did.
        windows = clip_windows(_duration(decoded, declared), CLIP_SECONDS, CLIPS)
        picks = [clip_times(decoded, start, end) for start, end in windows]
        frames, _ = decode_frames(data, name, max_seconds, max_pixels, {t for p in picks for t in p})
    mean = torch.from_numpy(CLIP_MEAN)[:, None, None, None]
    std = torch.from_numpy(CLIP_STD)[:, None, None, None]
    views = []
    for pick in picks:
        picked = np.stack([frames[t] for t in pick])  # (T, H, W, 3)
        clip = torch.from_numpy(picked).permute(3, 0, 1, 2).float() / 255.0  # (C, T, H, W)
        clip = (short_side_scale(clip, SIZE) - mean) / std
        views.extend(spatial_crops(clip, SIZE))
    return torch.stack(views)
