"""The NExT-GPT release's data formats, read by the same stages as the world's.

- Caption pairs (encoder- and decoder-side alignment): CC3M ``[{"image_name", "caption"}]``, WebVid
  ``[{"video_name", "caption"}]``, AudioCaps ``[{"audio_name", "caption"}]``; names are files under a media root.
- Instructions (T2M, MosIT style): ``[{"image_name"?, "output_modality", "conversation": [{"from": "human",
  "value", "input_modality"}, {"from": "gpt", "value", "caption", "output_modality"}, ...]}]``. A human turn whose
  ``input_modality`` is image/video/audio refers to the instance's media file; a gpt turn whose
  ``output_modality`` is image/video/audio ends with that modality's signal group, conditioned on its caption.

Media are encoded by the bundle's own encoder with the serving preprocessing; captions by the bundle's decoders'
own text encoders. Both are cached: each file and each caption is encoded once.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.bundle.loader import Bundle
from services.contracts.llm import Turn
from services.training.examples import Example, SignalTarget
from services.training.targets import DecoderTextEncoders
from services.training.world_tasks import Split

CAPTION_KEYS = {"image_name": "image", "video_name": "video", "audio_name": "audio"}
# The release's stage-1 instruction is a short caption request; a few phrasings of it.
CAPTION_PROMPTS = ("Generate a caption.", "Describe it briefly.", "What is this?")
MEDIA_MODALITIES = ("image", "video", "audio")


class DataFormatError(ValueError):
    pass


@dataclass(frozen=True)
class CaptionPair:
    modality: str
    path: Path
    caption: str


@dataclass(frozen=True)
class Instruction:
    media: tuple[str, Path] | None  # (modality, file) the human turns refer to
    turns: list[dict[str, Any]]


def _load_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:  # (a picture given as the data, say)
        raise DataFormatError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records")
    return data


def read_caption_pairs(path: Path, media_root: Path) -> list[CaptionPair]:
    pairs = []
    for i, row in enumerate(_load_list(path)):
        key = next((k for k in CAPTION_KEYS if k in row), None)
        if key is None or not isinstance(row.get("caption"), str):
            raise DataFormatError(f"{path}[{i}]: needs 'caption' and one of {sorted(CAPTION_KEYS)}")
        file = media_root / str(row[key])
        if not file.is_file():
            raise DataFormatError(f"{path}[{i}]: {file} does not exist")
        pairs.append(CaptionPair(CAPTION_KEYS[key], file, row["caption"].strip()))
    return pairs


def read_instructions(path: Path, media_root: Path) -> list[Instruction]:
    out = []
    for i, row in enumerate(_load_list(path)):
        turns = row.get("conversation")
        if not isinstance(turns, list) or not turns:
            raise DataFormatError(f"{path}[{i}]: needs a non-empty 'conversation'")
        for j, turn in enumerate(turns):
            if turn.get("from") not in ("human", "gpt") or not isinstance(turn.get("value"), str):
                raise DataFormatError(f"{path}[{i}].conversation[{j}]: needs 'from' (human|gpt) and 'value'")
            if turn["from"] == "gpt" and turn.get("output_modality", "text") in MEDIA_MODALITIES \
                    and not turn.get("caption"):
                raise DataFormatError(f"{path}[{i}].conversation[{j}]: a media reply needs its 'caption'")
        inputs = {t.get("input_modality") for t in turns if t["from"] == "human"} & set(MEDIA_MODALITIES)
        media = None
        if inputs:
            if len(inputs) > 1 or "image_name" not in row:
                raise DataFormatError(f"{path}[{i}]: media input needs one input modality and 'image_name'")
            file = media_root / str(row["image_name"])
            if not file.is_file():
                raise DataFormatError(f"{path}[{i}]: {file} does not exist")
            media = (inputs.pop(), file)
        out.append(Instruction(media, turns))
    return out


class BundleEncoders:
    """The bundle's encoder (files -> what its input projection takes) and its decoders' text encoders (captions -> targets)."""

    def __init__(self, bundle: Bundle, token_level: bool | None = None) -> None:
        from services.encoder.model import EncoderModel

        self.bundle = bundle
        self.token_level = bundle.manifest.encoder.projection.kind == "group" if token_level is None else token_level
        self.encoder = EncoderModel.from_bundle(bundle)
        self.vectors: list[torch.Tensor] = []
        self.rows: dict[Path, int] = {}
        self.targets: dict[tuple[str, str], torch.Tensor] = {}
        self.text = DecoderTextEncoders(bundle)

    @torch.inference_mode()
    def media_row(self, modality: str, path: Path) -> int:
        if path not in self.rows:
            from services.encoder.preprocess.audio import preprocess_audio
            from services.encoder.preprocess.image import preprocess_image
            from services.encoder.preprocess.video import preprocess_video

            data = path.read_bytes()
            if modality == "image":
                x = preprocess_image(data, path.name, max_pixels=1 << 26)[None]
            elif modality == "video":
                x = preprocess_video(data, path.name, max_seconds=600, max_pixels=1 << 24)[None]
            else:
                x = preprocess_audio(data, path.name, max_seconds=600)[None]
            self.rows[path] = len(self.vectors)
            features = self.encoder.tokens if self.token_level else self.encoder.embed
            self.vectors.append(features(modality, x)[0])  # type: ignore[arg-type]
        return self.rows[path]

    def target(self, modality: str, caption: str) -> torch.Tensor:
        key = (modality, caption)
        if key not in self.targets:
            self.targets[key] = self.text.encode(modality, [caption])[0]
        return self.targets[key]

    @property
    def table(self) -> torch.Tensor:
        from services.encoder.model import pad_tokens

        return pad_tokens(self.vectors) if self.vectors else torch.zeros(0, 1024)


def caption_examples(pairs: list[CaptionPair], encoders: BundleEncoders, stage: str, count: int,
                     seed: int) -> list[Example]:
    """Stage 1: media + a caption request -> the caption. Stage 2: the caption -> the signal group."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        pair = rng.choice(pairs)
        if stage == "align-encoder":
            row = encoders.media_row(pair.modality, pair.path)
            out.append(Example([Turn(role="user", text=rng.choice(CAPTION_PROMPTS), media=[0])], [row], pair.caption))
        else:
            target = SignalTarget(pair.modality, encoders.target(pair.modality, pair.caption))  # type: ignore[arg-type]
            out.append(Example([Turn(role="user", text=pair.caption)], [], "", [target]))
    return out


def instruction_examples(items: list[Instruction], encoders: BundleEncoders, count: int, seed: int) -> list[Example]:
    """Each gpt turn is a reply to learn, with the turns before it as history (media on the first human turn)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        item = rng.choice(items)
        media_rows = [encoders.media_row(*item.media)] if item.media else []
        answers = [j for j, t in enumerate(item.turns) if t["from"] == "gpt"]
        if not answers:
            continue
        last = rng.choice(answers)
        turns, placed = [], False
        for t in item.turns[:last]:
            wants_media = t["from"] == "human" and t.get("input_modality") in MEDIA_MODALITIES and not placed
            placed = placed or wants_media
            turns.append(Turn(role="user" if t["from"] == "human" else "assistant", text=t["value"],
                              media=[0] if wants_media else []))
        if not turns or turns[-1].role != "user":
            continue
        reply = item.turns[last]
        modality = reply.get("output_modality", "text")
        signals = [SignalTarget(modality, encoders.target(modality, reply["caption"]))] \
            if modality in MEDIA_MODALITIES else []
        out.append(Example(turns, media_rows, reply["value"], signals))  # type: ignore[arg-type]
    return out


def release_examples(path: Path, media_root: Path, stage: str, encoders: BundleEncoders, count: int, seed: int,
                     split: Split = "train") -> list[Example]:
    """Examples from a release-format file; every 10th record is held out (``split="eval"``) from training."""
    rows = _load_list(path)
    keep = (lambda i: i % 10 == 9) if split == "eval" else (lambda i: i % 10 != 9 or len(rows) < 10)
    if rows and isinstance(rows[0], dict) and "conversation" in rows[0]:
        items = [x for i, x in enumerate(read_instructions(path, media_root)) if keep(i)]
        return instruction_examples(items, encoders, count, seed) if items else []
    pairs = [x for i, x in enumerate(read_caption_pairs(path, media_root)) if keep(i)]
    return caption_examples(pairs, encoders, stage, count, seed) if pairs else []
