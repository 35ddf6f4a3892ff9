"""Backgrounds behind the world's shapes: what they may be, how a shape is laid on one, a transparent picture."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from services.world.attributes import COLOURS, HUE_CENTRES, Attributes
from services.world.backgrounds import CLASH_DEGREES, KINDS, draw_background, transparent_picture
from services.world.render import render_image, render_video

pytestmark = pytest.mark.unit


def _hue_gap(rgb: np.ndarray, colour: str) -> tuple[float, bool]:
    """(degrees from ``colour``'s hue centre, whether the colour is too pale or dark for a hue to be read)."""
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    gap = abs(h * 360.0 - HUE_CENTRES[colour]) % 360.0
    return min(gap, 360.0 - gap), s < 0.25 or v < 0.3


@pytest.mark.parametrize("colour", COLOURS)
def test_a_background_never_takes_the_shapes_colour(colour: str) -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        # Noise off: the mean of a plain background is its colour.
        kind = str(rng.choice(["colour", "grey"]))
        background = draw_background(rng, colour, kind)
        gap, muted = _hue_gap(background.reshape(-1, 3).mean(0), colour)
        assert muted or gap >= CLASH_DEGREES - 1.0, (kind, background[0, 0])


def test_each_kind_draws_and_black_is_black() -> None:
    rng = np.random.default_rng(0)
    for kind in KINDS:
        background = draw_background(rng, "red", kind)
        assert background.shape == (64, 64, 3) and background.dtype == np.float32
        assert 0.0 <= background.min() and background.max() <= 1.0
    assert not draw_background(rng, "red", "black").any()
    with pytest.raises(ValueError, match="unknown background kind 'plaid'"):
        draw_background(rng, "red", "plaid")


def test_a_shape_lies_on_its_background_and_black_is_the_world_as_drawn() -> None:
    want = Attributes(size="big", colour="green", shape="square")
    background = np.full((64, 64, 3), 0.5, dtype=np.float32)
    plain, behind = render_image(3, 1, want), render_image(3, 1, want, background=background)
    assert np.array_equal(render_image(3, 1, want, background=np.zeros_like(background)).data, plain.data)
    added = np.asarray(behind.data, np.float32) - plain.data  # (1 - coverage) * 128
    assert (added.max(axis=-1) >= 127).mean() > 0.5  # most of the picture is the grey behind the shape
    inside = plain.data.max(axis=-1) == plain.data.max()
    assert np.array_equal(behind.data[inside], plain.data[inside])  # the shape itself is unchanged
    clip = render_video(3, 1, background=background).data
    assert (clip[:, 0, 0] == 128).all()  # every frame on the same background (a corner the shape never reaches)


def test_a_transparent_picture_over_black_or_white_is_the_picture_drawn_there() -> None:
    want = Attributes(size="small", colour="blue", shape="triangle")
    rgba = transparent_picture(11, 2, want).astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    white = np.ones((64, 64, 3), dtype=np.float32)
    assert 0.0 < alpha.mean() < 0.2  # a small shape: most of the picture is transparent
    for behind, drawn in ((0.0, render_image(11, 2, want)), (255.0, render_image(11, 2, want, background=white))):
        composed = rgba[..., :3] * alpha + behind * (1 - alpha)
        assert np.abs(composed - drawn.data).max() <= 2.0
