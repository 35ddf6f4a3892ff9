"""Training examples as conversations, turned into the exact token layout the serving prompt builder makes.

A conversation is the serving ``Turn`` list (user and assistant turns; media by index) plus the final reply to
learn: its text and the output signal groups that follow it, each with the conditioning its decoder should get.
The prompt is laid out by ``services.llm.prompt`` (the same code that builds prompts at serving time), so a
model trained here sees at training time exactly what it is served.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.contracts.bundle_manifest import BundleManifest, Modality
from services.contracts.llm import Turn
from services.llm.prompt import prompt_ids, prompt_pieces

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class SignalTarget:
    modality: Modality
    conditioning: torch.Tensor  # what the decoder's own text encoder makes of the caption, e.g. (77, d) or (d,)


@dataclass(frozen=True)
class Example:
    turns: list[Turn]  # ends with the user's turn
    media: list[int]  # row of each media index in the media table (ImageBind vectors)
    reply: str  # the assistant's text, without the leading space
    signals: list[SignalTarget] = field(default_factory=list)


@dataclass
class Encoded:
    """One example as ids: -1 marks a media slot (the input projection's tokens of one item: one, or a few with
    ``group``); labels -100 where no loss is taken."""

    ids: list[int]
    labels: list[int]
    media_rows: list[int]  # media-table row of each media item, in order
    groups: list[tuple[int, SignalTarget]]  # (position of the group's first signal token, its target)


def encode_example(manifest: BundleManifest, encode: Encode, example: Example) -> Encoded:
    plan = prompt_ids(manifest.prompt, prompt_pieces(manifest.prompt, example.turns), encode)
    ids: list[int] = []
    media_rows: list[int] = []
    tokens = manifest.encoder.projection.tokens_per_item
    for part in plan:
        if isinstance(part, int):
            ids.extend([-1] * tokens)
            media_rows.append(example.media[part])
        else:
            ids.extend(part)
    labels = [-100] * len(ids)
    groups: list[tuple[int, SignalTarget]] = []
    # The reply as the model generates it: " text", then each signal group, then the turn separator.
    target = encode(" " + example.reply) if example.reply else []
    for signal in example.signals:
        groups.append((len(ids) + len(target), signal))
        target += list(manifest.outputs[signal.modality].signal.token_ids)
    target += encode(manifest.prompt.turn_separator)
    return Encoded(ids + target, labels + target, media_rows, groups)
