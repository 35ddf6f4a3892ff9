"""ImageBind stand-in, phases 6 and 7: the world's media as users send them read as the world's own.

Phases 1-5 see the world as drawn: one shape on black, tones of exactly 1 s. The towers they leave read nothing
else. Through the API a red circle on white, on grey or on a coloured card came back "A big blue square." every
time (and so did a transparent PNG, which the encoder lays on white), and a high steady tone of 2 s or more
"A big red triangle.": ImageBind's audio preprocessing takes three 2 s windows, which a 1 s tone fills half of.

These phases teach the towers what does not matter, by distillation from themselves. The tower as phases 1-5 left
it (the teacher, frozen) reads the world's own sample: the shape on black, the tone of 1 s. The tower being trained
(the student) must give the same token-level features (the ones the ``group`` input projection reads, the pooled
one first) for the same sample as a user may send it: on a background drawn from ``services.world.backgrounds``
(a quarter of them black), or played for 0.5 to 8 s. So a world sample's features stay what the stages above
were trained on, and those stages need no retraining for the student: a shape on white, or a long tone, reaches
the LLM as its world twin would.

Phase 6 trains the vision branch (pictures, and clips with one background for all their frames), phase 7 the audio
branch; nothing else changes. Every sample is drawn fresh (``INVARIANCE_SEED``, never an evaluation seed).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.encoder.preprocess.audio import wave_clips
from services.modeling.imagebind import modality_types, token_features
from services.world.backgrounds import draw_background
from services.world.pretrain.imagebind import image_inputs, video_inputs
from services.world.pretrain.loop import LoopConfig, device, local_shard, train_part
from services.world.render import render_audio, render_image, render_video

INVARIANCE_SEED = 7_000_003
TONE_SECONDS = (0.5, 8.0)  # a played tone's length, drawn uniformly (the world's is 1 s)


@dataclass(frozen=True)
class InvariancePhase:
    """``anchor``: the weight of a second distance, the student's features of the world samples themselves from
    the teacher's, which holds them where the stages above learnt them."""

    loop: LoopConfig
    counts: dict[str, int] = field(default_factory=dict)  # samples per step of each modality, all processes together
    anchor: float = 0.0


# Without the anchor, 1500 steps left fresh clips on black 0.069 from where they were, and their direction was
# described right 85% of the time instead of 96% (96 clips through the API); the anchor held them (README).
BACKGROUND_PHASE = InvariancePhase(LoopConfig(steps=2100, lr=5e-4, warmup=50), {"image": 32, "video": 16}, anchor=1.0)
TONE_LENGTH_PHASE = InvariancePhase(LoopConfig(steps=1500, lr=5e-4, warmup=50), {"audio": 32})


def branch_key(modality: str) -> str:
    types = modality_types()
    return types.AUDIO if modality == "audio" else types.VISION


def branch_prefixes(modality: str) -> tuple[str, ...]:
    key = branch_key(modality)
    return tuple(f"{part}.{key}." for part in ("modality_preprocessors", "modality_trunks", "modality_heads"))


def branch_tokens(model: nn.Module, modality: str, x: torch.Tensor, views: int = 1) -> torch.Tensor:
    """(B, T, 1024) token features with gradients, as the encoder serves them: ``x`` holds ``views`` inputs per
    item (a sound's clips), whose features are averaged token by token."""
    key = branch_key(modality)
    inputs = model.modality_preprocessors[key](**{key: x})
    out = token_features(model, key, model.modality_trunks[key](**inputs["trunk"]))
    return out.reshape(-1, views, *out.shape[1:]).mean(dim=1)


def feature_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the features (2 - 2 cos for unit ones), the pooled token weighted as all the
    others together: the ``linear`` projection reads it alone."""
    per_token = (student - teacher).pow(2).sum(-1)
    return (per_token[:, 0] + per_token[:, 1:].mean(1)).mean() / 2


@dataclass(frozen=True)
class Pairs:
    """A batch of world samples (the teacher's inputs) and the same samples as a user may send them (the
    student's, ``views`` inputs per item)."""

    world: torch.Tensor
    sent: torch.Tensor
    views: int = 1


def _indices(generator: torch.Generator, count: int) -> list[int]:
    return local_shard(torch.randint(2**31 - 1, (count,), generator=generator)).tolist()


def background_pairs(modality: str, generator: torch.Generator, count: int) -> Pairs:
    """This process's share of ``count`` fresh pictures or clips: on black, and on a drawn background."""
    render = render_image if modality == "image" else render_video
    prepare = image_inputs if modality == "image" else video_inputs
    black, behind = [], []
    for index in _indices(generator, count):
        plain = render(INVARIANCE_SEED, index)
        background = draw_background(np.random.default_rng([INVARIANCE_SEED, index, 6]), plain.attributes.colour)
        black.append(plain.data)
        behind.append(render(INVARIANCE_SEED, index, background=background).data)
    return Pairs(prepare(np.stack(black)).float(), prepare(np.stack(behind)).float())


def tone_length_pairs(modality: str, generator: torch.Generator, count: int) -> Pairs:
    """This process's share of ``count`` fresh tones: of 1 s (its three clips are the same, so one is taken), and
    played for a drawn length, through the encoder's own clips."""
    world, sent = [], []
    for index in _indices(generator, count):
        seconds = float(np.random.default_rng([INVARIANCE_SEED, index, 7]).uniform(*TONE_SECONDS))
        world.append(wave_clips(torch.from_numpy(render_audio(INVARIANCE_SEED, index).data)[None], "world")[0])
        played = render_audio(INVARIANCE_SEED, index, seconds=seconds).data
        sent.append(wave_clips(torch.from_numpy(played)[None], "world"))
    return Pairs(torch.stack(world), torch.cat(sent), views=len(sent[0]))


PairsFn = Callable[[str, torch.Generator, int], Pairs]


def distil(model: nn.Module, name: str, pairs: PairsFn, phase: InvariancePhase, workdir: Path,
           progress: bool = True) -> nn.Module:
    """Train the branches of ``phase.counts``' modalities so that what ``pairs`` sends reads as ``model`` reads
    the world's own samples now."""
    teacher = copy.deepcopy(model).to(device()).eval().requires_grad_(False)
    trained = tuple(prefix for modality in phase.counts for prefix in branch_prefixes(modality))
    for param_name, param in model.named_parameters():
        param.requires_grad_(param_name.startswith(trained))

    def step_loss(generator: torch.Generator) -> dict[str, torch.Tensor]:
        losses = {}
        for modality, count in phase.counts.items():
            batch = pairs(modality, generator, count)
            with torch.no_grad():
                target = branch_tokens(teacher, modality, batch.world.to(device()))
            got = branch_tokens(model, modality, batch.sent.to(device()), batch.views)
            losses[modality] = feature_distance(got, target)
            if phase.anchor:
                own = branch_tokens(model, modality, batch.world.to(device()))
                losses[f"{modality}_world"] = phase.anchor * feature_distance(own, target)
        return losses

    train_part(name, model, step_loss, phase.loop, workdir, progress=progress)
    model.requires_grad_(True)
    return model.eval()


def distil_backgrounds(model: nn.Module, phase: InvariancePhase, workdir: Path, progress: bool = True) -> nn.Module:
    return distil(model, "imagebind phase 6 (backgrounds)", background_pairs, phase, workdir, progress)


def distil_tone_lengths(model: nn.Module, phase: InvariancePhase, workdir: Path, progress: bool = True) -> nn.Module:
    return distil(model, "imagebind phase 7 (tone lengths)", tone_length_pairs, phase, workdir, progress)


INVARIANCE_PHASES: dict[int, tuple[Callable[..., nn.Module], InvariancePhase]] = {
    6: (distil_backgrounds, BACKGROUND_PHASE), 7: (distil_tone_lengths, TONE_LENGTH_PHASE),
}


def distil_bundle_encoder(bundle_dir: Path, work: Path, numbers: Sequence[int], steps: int | None = None,
                          seed: int = 0, progress: bool = True) -> Path:
    """Run invariance phases on a bundle's ImageBind and write its weights back (in the dtype they were kept in):
    what stages 1-3 were trained on stays as it was, so a bundle trained before these phases existed gains them
    without retraining. Each phase resumes from ``work/phase<n>``; its loop seed is the recipe's (seed + n - 1)."""
    from safetensors.torch import load_file

    from services.bundle.loader import load_bundle
    from services.bundle.manifest_io import tag_version
    from services.bundle.tensor_io import save_state_dict
    from services.modeling.imagebind import build_imagebind, load_served_weights

    unknown = sorted(set(numbers) - set(INVARIANCE_PHASES))
    if unknown:
        raise ValueError(f"unknown invariance phases {unknown}; choose from {sorted(INVARIANCE_PHASES)}")
    bundle = load_bundle(bundle_dir)
    path = bundle.path(bundle.manifest.encoder.weights)
    state = load_file(str(path))
    model = build_imagebind(bundle.manifest.encoder.config)
    load_served_weights(model, {k: v.float() for k, v in state.items()}, str(path))
    for number in sorted(numbers):
        distil_fn, phase = INVARIANCE_PHASES[number]
        loop = dataclasses.replace(phase.loop, steps=steps or phase.loop.steps, seed=seed + number - 1)
        model = distil_fn(model, dataclasses.replace(phase, loop=loop), work / f"phase{number}", progress=progress)
    trained = model.state_dict()
    save_state_dict({k: trained[k].to(v.dtype) for k, v in state.items()}, path)
    tag = "+imagebind-" + "-".join(f"phase{n}" for n in sorted(numbers))
    tag_version(bundle.root, bundle.manifest, tag)
    return path
