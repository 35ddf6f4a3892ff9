"""ImageBind stand-in: the real ``ImageBindModel`` at small width, bound to text by InfoNCE per modality.

ImageBind binds every modality to a shared space through image/text pairs; here each of image, video and audio
is bound to its captions. Each step scores a batch of media against every caption of its modality (the world's
caption sets are small and closed), which is the zero-shot retrieval task the check measures. The inputs go
through the same preprocessing as the encoder service (224 px CLIP-normalised frames; 128 x 204 Kaldi fbank),
so what the stand-in learns is what it is served.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from services.contracts.bundle_manifest import ImageBindConfig
from services.encoder.preprocess.audio import clip_to_melspec
from services.encoder.preprocess.image import CLIP_MEAN, CLIP_STD, SIZE, center_crop, normalize, resize_short_side
from services.encoder.preprocess.video import short_side_scale
from services.modeling.imagebind import build_imagebind, imagebind_models, modality_types
from services.world.attributes import MOTIONS, WORLD_MODALITIES, WorldModality, all_captions, caption
from services.world.dataset import WorldSplit
from services.world.render import render_video
from services.world.pretrain.loop import LoopConfig, device, local_shard, train_part

WORLD_IMAGEBIND = ImageBindConfig(
    out_embed_dim=1024,
    vision_embed_dim=96, vision_num_blocks=3, vision_num_heads=4,
    text_embed_dim=64, text_num_blocks=2, text_num_heads=4,
    audio_embed_dim=64, audio_num_blocks=2, audio_num_heads=4,
    depth_embed_dim=32, depth_num_blocks=1, depth_num_heads=4,
    thermal_embed_dim=32, thermal_num_blocks=1, thermal_num_heads=4,
    imu_embed_dim=32, imu_num_blocks=1, imu_num_heads=4,
    audio_drop_path=0.0, imu_drop_path=0.0,
)


def text_tokens(texts: list[str]) -> torch.Tensor:
    """ImageBind's own BPE tokenizer (CLIP's vocabulary shipped in the package): (N, 77) ids."""
    imagebind_models()
    module = importlib.import_module("imagebind.models.multimodal_preprocessors")
    package = Path(module.__file__).parent.parent
    tokenizer = module.SimpleTokenizer(bpe_path=str(package / "bpe" / "bpe_simple_vocab_16e6.txt.gz"))
    return tokenizer(texts)


def image_inputs(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, 64, 64, 3) -> (N, 3, 224, 224), exactly as the encoder service preprocesses a picture."""
    out = [normalize(np.asarray(center_crop(resize_short_side(Image.fromarray(p), SIZE), SIZE))) for p in pixels]
    return torch.from_numpy(np.stack(out)).to(torch.float16)


def video_inputs(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, 8, 64, 64, 3) -> (N, 3, 2, 224, 224): a 1 s clip is one 2 s window whose first and last frames
    the encoder service takes (its 15 views are then identical), bilinear short-side scale, CLIP mean/std."""
    picked = torch.from_numpy(frames[:, [0, -1]]).permute(0, 4, 1, 2, 3).float() / 255.0  # (N, 3, 2, H, W)
    mean = torch.from_numpy(CLIP_MEAN)[:, None, None, None]
    std = torch.from_numpy(CLIP_STD)[:, None, None, None]
    return torch.stack([(short_side_scale(c, SIZE) - mean) / std for c in picked]).to(torch.float16)


def audio_inputs(waves: np.ndarray) -> torch.Tensor:
    """int16 (N, 16000) -> (N, 1, 128, 204) fbank, as the encoder service computes each 2 s clip."""
    out = [clip_to_melspec(torch.from_numpy(w.astype(np.float32) / 32767.0)[None], "world") for w in waves]
    return torch.stack(out).to(torch.float16)


PREPARE = {"image": image_inputs, "video": video_inputs, "audio": audio_inputs}


def embed(model: nn.Module, key: str, x: torch.Tensor) -> torch.Tensor:
    """One ImageBind branch with gradients: preprocessor, trunk, head, L2 normalisation (no logit scale)."""
    inputs = model.modality_preprocessors[key](**{key: x})
    out = model.modality_trunks[key](**inputs["trunk"])
    out = model.modality_heads[key](out, **inputs["head"])
    return F.normalize(out, dim=-1)


class Binder(nn.Module):
    """ImageBind plus the learned temperature of the contrastive loss (kept out of the exported weights)."""

    def __init__(self, config: ImageBindConfig) -> None:
        super().__init__()
        self.imagebind = build_imagebind(config)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def _branch(modality: WorldModality) -> str:
    types = modality_types()
    return types.AUDIO if modality == "audio" else types.VISION


@dataclass(frozen=True)
class Phase:
    """A stretch of training with its own schedule and per-modality batch sizes. ``fresh_clips``: the clips are
    drawn anew every step (seed FRESH_CLIP_SEED, never an evaluation seed) instead of from the training split;
    ``motion_groups``: they come in groups of four that differ only in their motion (the same shape, colour,
    size, hue and path length), so each caption's nearest rivals in the batch are its other three directions."""

    loop: LoopConfig
    batch_sizes: dict[str, int]
    fresh_clips: bool = False
    motion_groups: bool = False


FRESH_CLIP_SEED = 7_000_001


def fresh_clips(generator: torch.Generator, count: int, motion_groups: bool) -> tuple[np.ndarray, list[str]]:
    """``count`` clips never seen before (this process's share of them), uint8 (N, 8, 64, 64, 3), and captions.
    With ``motion_groups`` the shares are whole groups of four."""
    group = len(MOTIONS) if motion_groups else 1
    firsts = torch.randint(2**31 - 1, (max(1, count // group),), generator=generator)
    clips, captions = [], []
    for index in local_shard(firsts).tolist():
        drawn = render_video(FRESH_CLIP_SEED, index)
        wanted = ([dataclasses.replace(drawn.attributes, motion=m) for m in MOTIONS] if motion_groups
                  else [drawn.attributes])
        for attrs in wanted:
            sample = render_video(FRESH_CLIP_SEED, index, attrs) if attrs != drawn.attributes else drawn
            clips.append(sample.data)
            captions.append(caption("video", attrs))
    return np.stack(clips), captions


# Phase 1 binds all three modalities evenly; pictures and tones are learnt by then (retrieval ~99-100%) while
# motion, which the vision stem only sees as the difference between a clip's two frames, is not, so phases 2
# and 3 spend their batches on clips and keep a few pictures and tones so that they are not forgotten. After
# them, fresh clips are retrieved only 64% of the time, the direction being what is missed. Phase 4 draws every
# clip fresh (no path of the split to remember), in groups of the four directions of one shape, so that on the
# caption -> clip side of the loss a caption's rivals are the same shape going elsewhere; phase 5 settles it on
# plain fresh clips.
IMAGEBIND_PHASES = (
    Phase(LoopConfig(steps=800, lr=1e-3, warmup=50), {"image": 48, "video": 48, "audio": 48}),
    Phase(LoopConfig(steps=600, lr=1e-3, warmup=20), {"image": 16, "video": 64, "audio": 16}),
    Phase(LoopConfig(steps=300, lr=5e-4, warmup=20), {"image": 8, "video": 64, "audio": 8}),
    Phase(LoopConfig(steps=1000, lr=5e-4, warmup=20), {"image": 8, "video": 64, "audio": 8}, fresh_clips=True,
          motion_groups=True),
    Phase(LoopConfig(steps=800, lr=2e-4, warmup=20), {"image": 8, "video": 64, "audio": 8}, fresh_clips=True),
)


def pretrain_imagebind(splits: dict[WorldModality, WorldSplit], phases: tuple[Phase, ...], workdir: Path,
                       config: ImageBindConfig = WORLD_IMAGEBIND, seed: int = 0, progress: bool = True) -> nn.Module:
    """Train ``phases`` in turn from a fresh model (phase n's checkpoints under ``workdir/phase<n>``)."""
    torch.manual_seed(seed)
    binder = Binder(config)
    text_key = modality_types().TEXT
    inputs = {m: PREPARE[m](splits[m].data) for m in WORLD_MODALITIES if m in splits}
    candidates = {m: all_captions(m) for m in inputs}
    tokens = {m: text_tokens(candidates[m]) for m in inputs}
    targets = {m: torch.tensor([candidates[m].index(c) for c in splits[m].captions]) for m in inputs}

    def media_batch(modality: WorldModality, generator: torch.Generator, phase: Phase
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        if modality == "video" and phase.fresh_clips:
            clips, names = fresh_clips(generator, phase.batch_sizes[modality], phase.motion_groups)
            return video_inputs(clips), torch.tensor([candidates[modality].index(c) for c in names])
        x = inputs[modality]
        pick = local_shard(torch.randint(len(x), (phase.batch_sizes[modality],), generator=generator))
        return x[pick], targets[modality][pick]

    def step_loss(generator: torch.Generator, phase: Phase) -> dict[str, torch.Tensor]:
        losses = {}
        scale = binder.log_scale.clamp(max=math.log(100.0)).exp()
        for modality in inputs:
            x, labels = media_batch(modality, generator, phase)
            media = embed(binder.imagebind, _branch(modality), x.to(device()).float())
            text = embed(binder.imagebind, text_key, tokens[modality].to(device()))
            logits = scale * media @ text.T
            # Media -> caption over all captions; caption -> media over the captions present in the batch.
            labels = labels.to(device())
            media_to_text = F.cross_entropy(logits, labels)
            present = labels.unique()
            text_logits = logits.T[present]
            match = (labels[None, :] == present[:, None]).float()
            positives = match.sum(1, keepdim=True)
            # Cross-entropy against the uniform target over a caption's positives, less that target's entropy
            # (a KL divergence): 0 at the optimum, whatever the number of duplicates in the batch.
            text_to_media = (-(F.log_softmax(text_logits, dim=1) * match / positives).sum(1)
                             - positives[:, 0].log()).mean()
            losses[modality] = (media_to_text + text_to_media) / 2
        return losses

    for number, phase in enumerate(phases, start=1):
        loop = LoopConfig(**{**phase.loop.__dict__, "seed": seed + number - 1})
        train_part(f"imagebind phase {number}", binder, functools.partial(step_loss, phase=phase),
                   loop, workdir / f"phase{number}", progress=progress)
    return binder.imagebind.eval()


@torch.inference_mode()
def retrieval_accuracy(model: nn.Module, split: WorldSplit, batch_size: int = 64) -> float:
    """Top-1 zero-shot retrieval: each sample's nearest caption among all captions of its modality."""
    candidates = all_captions(split.modality)
    text = embed(model, modality_types().TEXT, text_tokens(candidates))
    x = PREPARE[split.modality](split.data)
    right = 0
    for i in range(0, len(x), batch_size):
        media = embed(model, _branch(split.modality), x[i:i + batch_size].float())
        best = (media @ text.T).argmax(dim=1).tolist()
        right += sum(candidates[b] == c for b, c in zip(best, split.captions[i:i + batch_size]))
    return right / max(1, len(split))
