"""The world's vocabulary: the classes a sample is drawn from and the words its captions use.

Every class is a range, not a value (a hue band, a size band, a frequency band), so that a model must learn the
class and not one pixel pattern. The renderers and the measures both read these ranges, which keeps what is drawn
and what is judged the same definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WorldModality = Literal["image", "video", "audio"]
WORLD_MODALITIES: tuple[WorldModality, ...] = ("image", "video", "audio")

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "big")
MOTIONS = ("left", "right", "up", "down")
PITCHES = ("low", "high")
RHYTHMS = ("steady", "beeping")

# Hue centre (degrees) of each colour; samples jitter within +-HUE_JITTER.
HUE_CENTRES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "blue": 240.0}
HUE_JITTER = 8.0
# Half-extent of the shape in pixels (radius of the circle, half side of the square and triangle).
SIZE_RANGES = {"small": (5.0, 8.0), "big": (12.0, 16.0)}
# Total displacement of a moving shape over the clip, pixels.
MOTION_RANGE = (16.0, 22.0)
MOTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PITCH_RANGES = {"low": (200.0, 350.0), "high": (800.0, 1400.0)}
BEEP_HZ = 4.0

IMAGE_SIZE = 64
VIDEO_FRAMES = 8
VIDEO_FPS = 8
AUDIO_RATE = 16_000
AUDIO_SECONDS = 1.0

# Which attributes each modality's samples carry, in caption order.
ATTRIBUTES: dict[WorldModality, tuple[str, ...]] = {
    "image": ("size", "colour", "shape"),
    "video": ("size", "colour", "shape", "motion"),
    "audio": ("pitch", "rhythm"),
}
CLASSES: dict[str, tuple[str, ...]] = {
    "size": SIZES, "colour": COLOURS, "shape": SHAPES, "motion": MOTIONS, "pitch": PITCHES, "rhythm": RHYTHMS,
}


@dataclass(frozen=True)
class Attributes:
    """The classes one sample was drawn from; the fields its modality does not use are None."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None
    motion: str | None = None
    pitch: str | None = None
    rhythm: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def caption(modality: WorldModality, attrs: Attributes) -> str:
    """The canonical caption: "a big red circle", "a small blue square moving left", "a high beeping tone"."""
    if modality == "audio":
        return f"a {attrs.pitch} {attrs.rhythm} tone"
    text = f"a {attrs.size} {attrs.colour} {attrs.shape}"
    return f"{text} moving {attrs.motion}" if modality == "video" else text


def all_attributes(modality: WorldModality) -> list[Attributes]:
    """Every class combination of a modality, in a fixed order (the candidates of zero-shot retrieval)."""
    combos: list[dict[str, str]] = [{}]
    for name in ATTRIBUTES[modality]:
        combos = [{**c, name: value} for c in combos for value in CLASSES[name]]
    return [Attributes(**c) for c in combos]


def all_captions(modality: WorldModality) -> list[str]:
    return [caption(modality, a) for a in all_attributes(modality)]
