"""Simple, documented measures that read a class back from pixels or samples.

They judge what a model generated, so they look at coarse properties, not at exact pixels:

- colour: the hue of the mean colour of the foreground (pixels brighter than a fraction of the brightest),
  assigned to the nearest colour centre on the hue circle.
- shape: the fill ratio of the foreground's bounding box: a square fills it (1.0), a circle pi/4 (0.79),
  the triangle half (0.5); the thresholds sit half-way between.
- size: the larger side of that bounding box; small shapes span at most 16 px, big ones at least 24.
- motion: the foreground centroid per frame; the axis with the larger net displacement and its sign.
- pitch: the frequency of the largest peak of the windowed spectrum, against the geometric middle of the bands.
- rhythm: the modulation depth of the 10 ms RMS envelope (std / mean): a steady tone stays near 0, a 4 Hz
  on/off beep near 1.
"""

from __future__ import annotations

import colorsys
import math
from collections import Counter
from collections.abc import Callable

import numpy as np

from services.world.attributes import (
    AUDIO_RATE, HUE_CENTRES, PITCH_RANGES, SIZE_RANGES, Attributes, WorldModality,
)

FOREGROUND = 0.35  # fraction of the brightest pixel's value above which a pixel is the shape
SQUARE_FILL = (1.0 + math.pi / 4) / 2
TRIANGLE_FILL = (math.pi / 4 + 0.5) / 2
SIZE_SPLIT = (2 * SIZE_RANGES["small"][1] + 2 * SIZE_RANGES["big"][0]) / 2
PITCH_SPLIT = math.sqrt(PITCH_RANGES["low"][1] * PITCH_RANGES["high"][0])
RHYTHM_SPLIT = 0.5


def _as_float(pixels: np.ndarray) -> np.ndarray:
    x = np.asarray(pixels, dtype=np.float32)
    return x / 255.0 if x.max(initial=0.0) > 1.5 else x


def foreground(pixels: np.ndarray) -> np.ndarray:
    """Boolean mask of the shape in an (H, W, 3) picture: brightness above FOREGROUND of the brightest."""
    value = _as_float(pixels).max(axis=-1)
    peak = float(value.max(initial=0.0))
    if peak <= 0.05:
        return np.zeros(value.shape, dtype=bool)
    return value >= FOREGROUND * peak


def hue_of(pixels: np.ndarray) -> float | None:
    """Hue in degrees of the foreground's mean colour; None for an empty picture."""
    x = _as_float(pixels)
    mask = foreground(x)
    if not mask.any():
        return None
    r, g, b = x[mask].mean(axis=0)
    return colorsys.rgb_to_hsv(float(r), float(g), float(b))[0] * 360.0


def colour_of(pixels: np.ndarray) -> str | None:
    hue = hue_of(pixels)
    if hue is None:
        return None
    return min(HUE_CENTRES, key=lambda c: min(abs(hue - HUE_CENTRES[c]), 360 - abs(hue - HUE_CENTRES[c])))


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def fill_ratio(pixels: np.ndarray) -> float | None:
    mask = foreground(pixels)
    box = _bbox(mask)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    return float(mask.sum()) / float((y1 - y0 + 1) * (x1 - x0 + 1))


def shape_of(pixels: np.ndarray) -> str | None:
    ratio = fill_ratio(pixels)
    if ratio is None:
        return None
    if ratio >= SQUARE_FILL:
        return "square"
    return "circle" if ratio >= TRIANGLE_FILL else "triangle"


def size_of(pixels: np.ndarray) -> str | None:
    box = _bbox(foreground(pixels))
    if box is None:
        return None
    y0, y1, x0, x1 = box
    return "big" if max(y1 - y0 + 1, x1 - x0 + 1) >= SIZE_SPLIT else "small"


def centroid(pixels: np.ndarray) -> tuple[float, float] | None:
    """Brightness-weighted (x, y) centre of the foreground."""
    x = _as_float(pixels)
    mask = foreground(x)
    if not mask.any():
        return None
    weight = x.max(axis=-1) * mask
    ys, xs = np.mgrid[: mask.shape[0], : mask.shape[1]]
    total = float(weight.sum())
    return float((xs * weight).sum() / total), float((ys * weight).sum() / total)


def motion_of(frames: np.ndarray) -> str | None:
    """Direction of the net centroid displacement between the first and last thirds of the clip."""
    points = [c for c in (centroid(f) for f in frames) if c is not None]
    if len(points) < 2:
        return None
    third = max(1, len(points) // 3)
    start = np.mean(points[:third], axis=0)
    end = np.mean(points[-third:], axis=0)
    dx, dy = end - start
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def dominant_frequency(wave: np.ndarray, rate: int = AUDIO_RATE) -> float:
    x = np.asarray(wave, dtype=np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    spectrum[0] = 0.0
    return float(np.fft.rfftfreq(len(x), 1.0 / rate)[int(np.argmax(spectrum))])


def pitch_of(wave: np.ndarray, rate: int = AUDIO_RATE) -> str:
    return "high" if dominant_frequency(wave, rate) >= PITCH_SPLIT else "low"


def modulation_depth(wave: np.ndarray, rate: int = AUDIO_RATE) -> float:
    x = np.asarray(wave, dtype=np.float64)
    hop = rate // 100
    frames = len(x) // hop
    rms = np.sqrt((x[: frames * hop].reshape(frames, hop) ** 2).mean(axis=1))
    # The first and last 50 ms are left out: a decoder's edges often fade.
    rms = rms[5:-5] if frames > 20 else rms
    mean = float(rms.mean())
    return float(rms.std() / mean) if mean > 1e-6 else 0.0


def rhythm_of(wave: np.ndarray, rate: int = AUDIO_RATE) -> str:
    return "beeping" if modulation_depth(wave, rate) >= RHYTHM_SPLIT else "steady"


def _vote(read: Callable[[np.ndarray], str | None], frames: np.ndarray) -> str | None:
    """The most common reading over the frames (ties: the earliest), so one blurred frame does not decide."""
    votes = Counter(v for v in (read(f) for f in frames) if v is not None)
    return votes.most_common(1)[0][0] if votes else None


def measure(modality: WorldModality, data: np.ndarray) -> Attributes:
    """Every class the measures can read back from one sample of ``modality``."""
    if modality == "image":
        return Attributes(size=size_of(data), colour=colour_of(data), shape=shape_of(data))
    if modality == "video":
        frames = np.asarray(data)
        return Attributes(size=_vote(size_of, frames), colour=_vote(colour_of, frames),
                          shape=_vote(shape_of, frames), motion=motion_of(frames))
    return Attributes(pitch=pitch_of(data), rhythm=rhythm_of(data))
