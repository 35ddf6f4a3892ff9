"""The world on disk, and back.

Layout of a world folder (``nextgpt world data --out DIR``)::

    DIR/world.json        {"format": "nextgpt-world", "version": 1, "seed": S, "counts": {"image": N, ...}}
    DIR/image.npz         pixels: uint8 (N, 64, 64, 3)
    DIR/video.npz         frames: uint8 (N, 8, 64, 64, 3)   8 fps
    DIR/audio.npz         waveform: int16 (N, 16000)        16 kHz mono, full scale 32767
    DIR/<modality>.jsonl  one line per sample, in array order: {"index", "caption", "attributes": {...}}

Sample ``i`` of a modality is ``render(modality, seed, i)``: any count, same samples.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from services.world.attributes import Attributes, WORLD_MODALITIES, WorldModality
from services.world.render import Sample, render

WORLD_FORMAT = "nextgpt-world"
WORLD_VERSION = 1
_ARRAY_KEY = {"image": "pixels", "video": "frames", "audio": "waveform"}


@dataclass
class WorldSplit:
    """All samples of one modality held in memory: the media array and, per sample, caption and attributes."""

    modality: WorldModality
    data: np.ndarray
    captions: list[str]
    attributes: list[Attributes]

    def __len__(self) -> int:
        return len(self.captions)

    def media(self, index: int) -> np.ndarray:
        """Image/video as uint8; audio as float32 in [-1, 1]."""
        item = self.data[index]
        return item.astype(np.float32) / 32767.0 if self.modality == "audio" else item


def generate_split(modality: WorldModality, seed: int, count: int, start: int = 0,
                   progress: bool = False) -> WorldSplit:
    samples: Iterable[Sample] = (render(modality, seed, start + i) for i in range(count))
    if progress:
        samples = tqdm(samples, total=count, desc=f"world {modality}", unit="sample")
    items = list(samples)
    if modality == "audio":
        data = np.stack([np.round(np.clip(s.data, -1, 1) * 32767).astype(np.int16) for s in items]) if items else \
            np.zeros((0, 0), np.int16)
    else:
        data = np.stack([s.data for s in items]) if items else np.zeros((0,), np.uint8)
    return WorldSplit(modality, data, [s.caption for s in items], [s.attributes for s in items])


def write_world(out: Path, seed: int, counts: dict[WorldModality, int], progress: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for modality, count in counts.items():
        split = generate_split(modality, seed, count, progress=progress)
        np.savez(out / f"{modality}.npz", **{_ARRAY_KEY[modality]: split.data})
        with (out / f"{modality}.jsonl").open("w") as fh:
            for i, (text, attrs) in enumerate(zip(split.captions, split.attributes)):
                fh.write(json.dumps({"index": i, "caption": text, "attributes": attrs.as_dict()}) + "\n")
    header = {"format": WORLD_FORMAT, "version": WORLD_VERSION, "seed": seed, "counts": dict(counts)}
    (out / "world.json").write_text(json.dumps(header, indent=2) + "\n")


def read_world(folder: Path, modalities: Iterable[WorldModality] = WORLD_MODALITIES) -> dict[WorldModality, WorldSplit]:
    header_path = folder / "world.json"
    if not header_path.is_file():
        raise FileNotFoundError(f"{folder}: not a world folder (no world.json); make one with `nextgpt world data`")
    header = json.loads(header_path.read_text())
    if header.get("format") != WORLD_FORMAT or header.get("version") != WORLD_VERSION:
        raise ValueError(f"{header_path}: expected format {WORLD_FORMAT} version {WORLD_VERSION}")
    splits: dict[WorldModality, WorldSplit] = {}
    for modality in modalities:
        if modality not in header["counts"]:
            continue
        with np.load(folder / f"{modality}.npz") as arrays:
            data = arrays[_ARRAY_KEY[modality]]
        rows = [json.loads(line) for line in (folder / f"{modality}.jsonl").read_text().splitlines() if line]
        if len(rows) != len(data):
            raise ValueError(f"{folder}/{modality}.jsonl has {len(rows)} rows for {len(data)} samples")
        splits[modality] = WorldSplit(modality, data, [r["caption"] for r in rows],
                                      [Attributes(**r["attributes"]) for r in rows])
    return splits
