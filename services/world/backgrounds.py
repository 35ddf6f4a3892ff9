"""What lies behind a shape. The world is drawn on black, but a user's picture is not: a shape on paper, on a
grey slide, on a coloured card, or a transparent PNG (which the encoder lays on white). These backgrounds teach
ImageBind's vision tower that what is behind the shape does not change what the shape is
(``services/world/pretrain/invariance.py``) and judge it (``nextgpt eval world``'s background rows).

A background never takes the shape's own colour class: a red square on a red card has no answer in the world's
words. Its hue keeps ``CLASH_DEGREES`` from the shape's hue band unless it is pale or dark (low saturation or
value), where a hue is not read.
"""

from __future__ import annotations

import colorsys

import numpy as np

from services.world.attributes import HUE_CENTRES, IMAGE_SIZE, Attributes
from services.world.render import render_image

CLASH_DEGREES = 60.0
KINDS = ("black", "grey", "colour", "gradient")
# Chances of each kind: black keeps a quarter of the draws on the world as trained.
KIND_WEIGHTS = (0.25, 0.3, 0.25, 0.2)


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def background_colour(rng: np.random.Generator, shape_colour: str) -> np.ndarray:
    """One RGB in [0, 1] that cannot be read as ``shape_colour``: a grey, a pale or dark tint, or a vivid hue
    away from the shape's."""
    if rng.uniform() < 0.4:
        return np.full(3, rng.uniform(0.0, 1.0), dtype=np.float32)
    while True:
        hue = rng.uniform(0.0, 360.0)
        saturation, value = rng.uniform(0.0, 1.0), rng.uniform(0.15, 1.0)
        muted = saturation < 0.25 or value < 0.3
        if muted or _hue_distance(hue, HUE_CENTRES[shape_colour]) >= CLASH_DEGREES:
            return np.array(colorsys.hsv_to_rgb(hue / 360.0, saturation, value), dtype=np.float32)


def draw_background(rng: np.random.Generator, shape_colour: str, kind: str | None = None,
                    size: int = IMAGE_SIZE) -> np.ndarray:
    """A (size, size, 3) float32 background in [0, 1] of ``kind`` (drawn by ``KIND_WEIGHTS`` when None); any kind
    but black gets faint noise half the time, as a photo or a compressed file has."""
    kind = kind or str(rng.choice(KINDS, p=KIND_WEIGHTS))
    if kind == "black":
        return np.zeros((size, size, 3), dtype=np.float32)
    if kind == "grey":
        out = np.full((size, size, 3), rng.uniform(0.15, 1.0), dtype=np.float32)
    elif kind == "colour":
        out = np.broadcast_to(background_colour(rng, shape_colour), (size, size, 3)).astype(np.float32)
    elif kind == "gradient":
        a, b = background_colour(rng, shape_colour), background_colour(rng, shape_colour)
        angle = rng.uniform(0.0, 2 * np.pi)
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        t = np.clip(coords[None, :] * np.cos(angle) + coords[:, None] * np.sin(angle) + 0.5, 0.0, 1.0)
        out = a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]
    else:
        raise ValueError(f"unknown background kind {kind!r}; known: {', '.join(KINDS)}")
    if rng.uniform() < 0.5:
        out = out + rng.normal(0.0, rng.uniform(0.005, 0.025), out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def transparent_picture(seed: int, index: int, want: Attributes | None = None) -> np.ndarray:
    """The world picture ``(seed, index)`` as an RGBA (64, 64, 4) uint8 with nothing behind its shape: alpha is
    the shape's coverage (read from the picture drawn on black and on white), the colour the shape's own."""
    on_black = render_image(seed, index, want).data.astype(np.float32)
    on_white = render_image(seed, index, want, background=np.ones((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))
    alpha = 255.0 - (on_white.data.astype(np.float32) - on_black).max(axis=-1)
    colour = np.where(alpha[..., None] > 0, on_black * 255.0 / np.maximum(alpha[..., None], 1.0), 0.0)
    return np.concatenate([colour, alpha[..., None]], axis=-1).round().clip(0, 255).astype(np.uint8)
