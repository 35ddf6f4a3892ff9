"""Turn world conversations into training examples: media as the bundle's own (frozen) ImageBind vectors of
world samples, signal targets as the bundle's decoders' own text-encoder embeddings of the captions."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from services.bundle.loader import Bundle
from services.training.examples import Example, SignalTarget
from services.training.targets import DecoderTextEncoders
from services.training.world_tasks import Conversation, Split, Task as Source
from services.world.attributes import WORLD_MODALITIES, WorldModality, all_captions, caption
from services.world.dataset import WorldSplit


@torch.inference_mode()
def embed_world(bundle: Bundle, splits: dict[WorldModality, WorldSplit], batch: int = 64,
                cache: Path | None = None, token_level: bool | None = None) -> dict[str, torch.Tensor]:
    """What the bundle's input projection takes, for every sample, preprocessed as the encoder service does:
    ImageBind vectors (N, 1024), or token-level features (N, T, 1024) for a ``group`` projection.

    With ``cache`` (a folder), the vectors are kept under a name made of the encoder weights' digest and the
    samples' digest: the three stages share one frozen encoder, so they are computed once. ``token_level``
    overrides the bundle's design (stage 1 training a projection of the other design)."""
    from services.encoder.model import EncoderModel
    from services.world.pretrain.imagebind import PREPARE

    group = bundle.manifest.encoder.projection.kind == "group" if token_level is None else token_level
    path = None
    # Token-level features (``group``) are ~250x the pooled vectors: kept in memory (float16), not on disk.
    if cache is not None and not group:
        digest = hashlib.sha256(bundle.path(bundle.manifest.encoder.weights).read_bytes())
        for modality, split in splits.items():
            digest.update(modality.encode())
            digest.update(np.ascontiguousarray(split.data).tobytes())
        path = cache / f"imagebind-vectors-{digest.hexdigest()[:16]}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
    encoder = EncoderModel.from_bundle(bundle)
    out = {}
    for modality, split in splits.items():
        x = PREPARE[modality](split.data)
        features = encoder.tokens if group else encoder.embed
        dtype = torch.float16 if group else torch.float32
        rows = [features(modality, x[i:i + batch].float().unsqueeze(1)).to(dtype) for i in range(0, len(x), batch)]
        out[modality] = torch.cat(rows)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def decoder_targets(bundle: Bundle) -> dict[tuple[str, str], torch.Tensor]:
    """(modality, caption) -> what the modality's decoder pipeline computes from that caption itself."""
    encoders = DecoderTextEncoders(bundle)
    targets = {}
    for modality in WORLD_MODALITIES:
        captions = all_captions(modality)
        targets.update({(modality, c): v for c, v in zip(captions, encoders.encode(modality, captions))})
    return targets


class WorldExamples:
    """Examples from world conversations; each input medium is a random sample of the classes asked for."""

    def __init__(self, splits: dict[WorldModality, WorldSplit], vectors: dict[str, torch.Tensor],
                 targets: dict[tuple[str, str], torch.Tensor]) -> None:
        self.targets = targets
        tables, offset = [], 0
        self.rows: dict[tuple[str, str], list[int]] = defaultdict(list)
        for modality, split in splits.items():
            for i, text in enumerate(split.captions):
                self.rows[(modality, text)].append(offset + i)
            tables.append(vectors[modality])
            offset += len(split)
        if tables[0].ndim == 3:  # token features: pictures and sounds have different token counts
            longest = max(t.shape[1] for t in tables)
            tables = [F.pad(t, (0, 0, 0, longest - t.shape[1])) for t in tables]
        self.table = torch.cat(tables)
        self.attributes = {m: s.attributes for m, s in splits.items()}

    def conversation(self, source: Source, rng: random.Random, split: Split) -> Conversation:
        return source(rng, split, lambda modality: rng.choice(self.attributes[modality]))

    def examples(self, source: Source, count: int, seed: int, split: Split = "train") -> list[Example]:
        rng = random.Random(seed)
        return [self.example(self.conversation(source, rng, split), rng) for _ in range(count)]

    def example(self, conversation: Conversation, rng: random.Random) -> Example:
        media = []
        for modality, attrs in conversation.inputs:
            candidates = self.rows.get((modality, caption(modality, attrs)))
            if not candidates:
                raise ValueError(f"the world data has no {caption(modality, attrs)!r} ({modality})")
            media.append(rng.choice(candidates))
        signals = [SignalTarget(m, self.targets[(m, caption(m, a))]) for m, a in conversation.outputs]
        return Example(turns=conversation.turns, media=media, reply=conversation.reply, signals=signals)
