"""Draw one sample of the world: an image, a clip or a tone, deterministic for (seed, modality, index).

Each sample has its own random stream (``numpy`` seeded with the triple), so sample ``i`` is the same whatever
the number of samples asked for, and a held-out set is just another seed.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from services.world.attributes import (
    AUDIO_RATE, AUDIO_SECONDS, BEEP_HZ, CLASSES, HUE_CENTRES, HUE_JITTER, IMAGE_SIZE, MOTION_RANGE, MOTION_VECTORS,
    PITCH_RANGES, SIZE_RANGES, VIDEO_FRAMES, Attributes, WorldModality, caption,
)

_MODALITY_CODE = {"image": 1, "video": 2, "audio": 3}
_SUPERSAMPLE = 4  # edges are anti-aliased by drawing at 4x and averaging


@dataclass(frozen=True)
class Sample:
    modality: WorldModality
    attributes: Attributes
    caption: str
    # image: uint8 (64, 64, 3); video: uint8 (8, 64, 64, 3); audio: float32 (16000,) in [-1, 1]
    data: np.ndarray


def sample_rng(seed: int, modality: WorldModality, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _MODALITY_CODE[modality], index])


def _pick(rng: np.random.Generator, name: str) -> str:
    values = CLASSES[name]
    return values[int(rng.integers(len(values)))]


def colour_rgb(rng: np.random.Generator, colour: str) -> np.ndarray:
    hue = (HUE_CENTRES[colour] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360.0
    saturation, value = rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue / 360.0, saturation, value), dtype=np.float32)


def shape_mask(shape: str, cx: float, cy: float, half: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by the shape centred at (cx, cy) with half-extent ``half``."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    x, y = coords[None, :], coords[:, None]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":
        # Apex up, base at the bottom: base width and height both 2 * half.
        top, bottom = cy - half, cy + half
        t = np.clip((y - top) / (2 * half), 0.0, 1.0)
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= t * half)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def _paint(mask: np.ndarray, rgb: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """The shape in ``rgb`` over ``background`` ((H, W, 3) in [0, 1]; black when None), edges blended by coverage."""
    pixels = mask[..., None] * rgb[None, None, :]
    if background is not None:
        pixels = pixels + (1.0 - mask[..., None]) * background
    return np.round(pixels * 255.0).astype(np.uint8)


def render_image(seed: int, index: int, want: Attributes | None = None,
                 background: np.ndarray | None = None) -> Sample:
    rng = sample_rng(seed, "image", index)
    attrs = Attributes(size=_pick(rng, "size"), colour=_pick(rng, "colour"), shape=_pick(rng, "shape"))
    attrs = want or attrs
    half = rng.uniform(*SIZE_RANGES[attrs.size])
    cx, cy = rng.uniform(half + 1, IMAGE_SIZE - half - 1, size=2)
    pixels = _paint(shape_mask(attrs.shape, cx, cy, half), colour_rgb(rng, attrs.colour), background)
    return Sample("image", attrs, caption("image", attrs), pixels)


def render_video(seed: int, index: int, want: Attributes | None = None,
                 background: np.ndarray | None = None) -> Sample:
    rng = sample_rng(seed, "video", index)
    attrs = Attributes(size=_pick(rng, "size"), colour=_pick(rng, "colour"), shape=_pick(rng, "shape"),
                       motion=_pick(rng, "motion"))
    attrs = want or attrs
    half = rng.uniform(*SIZE_RANGES[attrs.size])
    distance = rng.uniform(*MOTION_RANGE)
    dx, dy = MOTION_VECTORS[attrs.motion]
    lo, hi = half + 1, IMAGE_SIZE - half - 1
    # Start where the whole path stays in the frame: along the motion axis, leave room for the distance.
    start = []
    for d in (dx, dy):
        if d > 0:
            start.append(rng.uniform(lo, hi - distance))
        elif d < 0:
            start.append(rng.uniform(lo + distance, hi))
        else:
            start.append(rng.uniform(lo, hi))
    rgb = colour_rgb(rng, attrs.colour)
    frames = []
    for f in range(VIDEO_FRAMES):
        step = distance * f / (VIDEO_FRAMES - 1)
        frames.append(_paint(shape_mask(attrs.shape, start[0] + dx * step, start[1] + dy * step, half), rgb,
                             background))
    return Sample("video", attrs, caption("video", attrs), np.stack(frames))


def render_audio(seed: int, index: int, want: Attributes | None = None, seconds: float = AUDIO_SECONDS) -> Sample:
    """The tone ``(seed, index)``; ``seconds`` other than the world's 1 s plays the same tone (frequency, loudness,
    phase, beat) for that long."""
    rng = sample_rng(seed, "audio", index)
    attrs = Attributes(pitch=_pick(rng, "pitch"), rhythm=_pick(rng, "rhythm"))
    attrs = want or attrs
    lo, hi = PITCH_RANGES[attrs.pitch]
    frequency = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    amplitude = rng.uniform(0.3, 0.6)
    n = int(AUDIO_RATE * seconds)
    t = np.arange(n, dtype=np.float64) / AUDIO_RATE
    wave = amplitude * np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi))
    if attrs.rhythm == "beeping":
        # On/off at BEEP_HZ with 5 ms ramps, so the envelope is the only thing that pulses (no clicks).
        phase = (t * BEEP_HZ + rng.uniform(0, 1)) % 1.0
        ramp = 0.005 * BEEP_HZ
        envelope = np.clip(np.minimum(phase, 0.5 - phase) / ramp, 0.0, 1.0)
        wave = wave * envelope
    return Sample("audio", attrs, caption("audio", attrs), wave.astype(np.float32))


RENDERERS = {"image": render_image, "video": render_video, "audio": render_audio}


def render(modality: WorldModality, seed: int, index: int, want: Attributes | None = None) -> Sample:
    """Sample ``index``; with ``want``, the same draw of positions, sizes and tones but of the classes asked for
    (the classes are drawn first either way, so the rest of the sample does not depend on ``want``)."""
    return RENDERERS[modality](seed, index, want)
