"""The world: deterministic samples, captions, the on-disk format, and measures that read classes back."""

from __future__ import annotations

import numpy as np
import pytest

from services.world.attributes import ATTRIBUTES, WORLD_MODALITIES, Attributes, all_captions, caption
from services.world.dataset import generate_split, read_world, write_world
from services.world.measures import (
    colour_of, dominant_frequency, measure, modulation_depth, motion_of, rhythm_of, shape_of,
)
from services.world.render import render, shape_mask

pytestmark = pytest.mark.unit


def test_captions_and_candidate_sets() -> None:
    assert caption("image", Attributes(size="big", colour="red", shape="circle")) == "a big red circle"
    assert caption("video", Attributes(size="small", colour="blue", shape="square", motion="left")) == \
        "a small blue square moving left"
    assert caption("audio", Attributes(pitch="high", rhythm="beeping")) == "a high beeping tone"
    assert [len(all_captions(m)) for m in WORLD_MODALITIES] == [24, 96, 4]
    assert len(set(all_captions("video"))) == 96


@pytest.mark.parametrize("modality", WORLD_MODALITIES)
def test_samples_are_deterministic_and_independent_of_count(modality: str) -> None:
    a = generate_split(modality, seed=3, count=5)  # type: ignore[arg-type]
    b = generate_split(modality, seed=3, count=9)  # type: ignore[arg-type]
    c = generate_split(modality, seed=4, count=5)  # type: ignore[arg-type]
    assert np.array_equal(a.data, b.data[:5]) and a.captions == b.captions[:5]
    assert not np.array_equal(a.data, c.data)


@pytest.mark.parametrize("modality", WORLD_MODALITIES)
def test_measures_read_back_every_class_of_fresh_samples(modality: str) -> None:
    wrong = []
    for i in range(150):
        sample = render(modality, 77, i)  # type: ignore[arg-type]
        got = measure(modality, sample.data)  # type: ignore[arg-type]
        for name in ATTRIBUTES[modality]:  # type: ignore[index]
            if getattr(got, name) != getattr(sample.attributes, name):
                wrong.append((i, name, getattr(sample.attributes, name), getattr(got, name)))
    assert wrong == []


def test_classes_vary_within_their_range() -> None:
    hues = {render("image", 0, i).data.reshape(-1, 3).max(axis=0).tobytes() for i in range(40)}
    assert len(hues) > 30  # colours jitter: no single pixel pattern per class
    freqs = [dominant_frequency(render("audio", 0, i).data) for i in range(40)]
    assert len({round(f) for f in freqs}) > 20


def test_measures_distinguish_what_they_claim() -> None:
    red = np.zeros((64, 64, 3), np.uint8)
    red[10:30, 10:30] = (230, 20, 20)
    assert colour_of(red) == "red" and shape_of(red) == "square"
    assert colour_of(red[..., [2, 1, 0]]) == "blue"
    circle = (shape_mask("circle", 32, 32, 12)[..., None] * np.array([0, 200, 0])).astype(np.uint8)
    assert shape_of(circle) == "circle" and colour_of(circle) == "green"
    triangle = (shape_mask("triangle", 32, 32, 12)[..., None] * np.array([220, 220, 0])).astype(np.uint8)
    assert shape_of(triangle) == "triangle" and colour_of(triangle) == "yellow"
    frames = np.stack([np.roll(red, shift=3 * f, axis=1) for f in range(8)])
    assert motion_of(frames) == "right" and motion_of(frames[::-1]) == "left"
    assert motion_of(np.stack([np.roll(red, shift=3 * f, axis=0) for f in range(8)])) == "down"
    t = np.arange(16000) / 16000
    tone = 0.5 * np.sin(2 * np.pi * 300 * t)
    assert abs(dominant_frequency(tone) - 300) <= 1 and rhythm_of(tone) == "steady"
    assert rhythm_of(tone * (np.sin(2 * np.pi * 4 * t) > 0)) == "beeping"
    assert modulation_depth(tone) < 0.1


def test_world_folder_round_trip(tmp_path) -> None:
    write_world(tmp_path, seed=5, counts={"image": 4, "video": 3, "audio": 2}, progress=False)
    splits = read_world(tmp_path)
    assert splits["image"].data.shape == (4, 64, 64, 3) and splits["image"].data.dtype == np.uint8
    assert splits["video"].data.shape == (3, 8, 64, 64, 3)
    assert splits["audio"].data.shape == (2, 16000) and splits["audio"].data.dtype == np.int16
    assert splits["video"].captions == [render("video", 5, i).caption for i in range(3)]
    assert np.abs(splits["audio"].media(1) - render("audio", 5, 1).data).max() < 1e-4
    with pytest.raises(FileNotFoundError, match="world.json"):
        read_world(tmp_path / "nothing")
