"""Video through the vision branch: 5 clips of 2 s, 2 frames each (first and last of the clip), short side
scaled to 224 (bilinear), CLIP mean/std, 3 spatial crops -> (15, 3, 2, 224, 224)."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F

from services.contracts.errors import PayloadTooLargeError
from services.encoder.preprocess import MediaError
from services.encoder.preprocess.clips import clip_windows
from services.encoder.preprocess.image import CLIP_MEAN, CLIP_STD, SIZE

CLIP_SECONDS = 2
CLIPS = 5
FRAMES_PER_CLIP = 2
CROPS = 3


def decode_frames(data: bytes, name: str, max_seconds: float, max_pixels: int) -> tuple[list[float], list[np.ndarray], float]:
    """Presentation times (s), RGB frames and the duration of the first video stream."""
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as exc:
        raise MediaError(f"{name}: not a readable video ({exc})", code="invalid_video", param=name) from exc
    with container:
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
        times: list[float] = []
        frames: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                # Headers can lie about the duration; the decoded timestamps cannot.
                if frame.time > max_seconds:
                    raise PayloadTooLargeError(f"{name}: video is longer than the limit of {max_seconds:.0f} s",
                                               code="video_too_long", param=name)
                times.append(float(frame.time))
                frames.append(frame.to_ndarray(format="rgb24"))
        except PayloadTooLargeError:
            raise
        except Exception as exc:
            if not frames:
                raise MediaError(f"{name}: corrupt video ({exc})", code="invalid_video", param=name) from exc
            # A truncated tail still leaves usable frames, as a demuxer reading to the end would.
    if not frames:
        raise MediaError(f"{name}: video has no frames", code="invalid_video", param=name)
    step = times[1] - times[0] if len(times) > 1 else 0.0
    duration = declared if declared else times[-1] + step
    return times, frames, duration


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


def clip_frames(times: list[float], frames: list[np.ndarray], start: Fraction, end: Fraction) -> list[np.ndarray]:
    """The frames presented in [start, end), subsampled uniformly to FRAMES_PER_CLIP."""
    inside = [f for t, f in zip(times, frames) if start <= Fraction(t) < end]
    if not inside:
        # A clip between two sparse frames: take the nearest earlier frame, so every clip has content.
        earlier = [f for t, f in zip(times, frames) if Fraction(t) < end]
        inside = [earlier[-1] if earlier else frames[0]]
    picks = torch.linspace(0, len(inside) - 1, FRAMES_PER_CLIP).long().tolist()
    return [inside[i] for i in picks]


def preprocess_video(data: bytes, name: str, max_seconds: float, max_pixels: int) -> torch.Tensor:
    times, frames, duration = decode_frames(data, name, max_seconds, max_pixels)
    mean = torch.from_numpy(CLIP_MEAN)[:, None, None, None]
    std = torch.from_numpy(CLIP_STD)[:, None, None, None]
    views = []
    for start, end in clip_windows(duration, CLIP_SECONDS, CLIPS):
        picked = np.stack(clip_frames(times, frames, start, end))  # (T, H, W, 3)
        clip = torch.from_numpy(picked).permute(3, 0, 1, 2).float() / 255.0  # (C, T, H, W)
        clip = (short_side_scale(clip, SIZE) - mean) / std
        views.extend(spatial_crops(clip, SIZE))
    return torch.stack(views)
