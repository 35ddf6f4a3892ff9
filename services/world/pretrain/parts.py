"""Run each pretraining part and export its result under the work folder (``WORK/<part>/``)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.world.dataset import read_world
from services.world.pretrain.loop import LoopConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartResult:
    part: str
    exported: Path
    metrics: dict[str, float]


def run_imagebind(data: Path, work: Path, steps: int, seed: int, progress: bool) -> PartResult:
    from services.bundle.tensor_io import save_state_dict
    from services.world.pretrain.imagebind import IMAGEBIND_PHASES, pretrain_imagebind
    from services.world.pretrain.invariance import INVARIANCE_PHASES

    splits = read_world(data)
    folder = work / "imagebind"
    # --steps scales every phase (a quick run); the recipe is IMAGEBIND_PHASES, then phases 6 and 7.
    total = sum(p.loop.steps for p in IMAGEBIND_PHASES) + sum(p.loop.steps for _, p in INVARIANCE_PHASES.values())

    def scaled(loop: LoopConfig, number: int) -> LoopConfig:
        return dataclasses.replace(loop, steps=max(1, loop.steps * steps // total), seed=seed + number - 1)

    phases = tuple(dataclasses.replace(p, loop=scaled(p.loop, n)) for n, p in enumerate(IMAGEBIND_PHASES, start=1))
    model = pretrain_imagebind(splits, phases, folder, seed=seed, progress=progress)
    for number, (distil, phase) in sorted(INVARIANCE_PHASES.items()):  # 6 and 7, after IMAGEBIND_PHASES' five
        model = distil(model, dataclasses.replace(phase, loop=scaled(phase.loop, number)), folder / f"phase{number}",
                       progress=progress)
    exported = folder / "imagebind.safetensors"
    save_state_dict(model, exported)
    return PartResult("imagebind", exported, {})




def write_result(result: PartResult, work: Path) -> None:
    """Record what a part exported, beside its checkpoints and loss log."""
    (work / result.part / "result.json").write_text(json.dumps(
        {"part": result.part, "exported": str(result.exported), "metrics": result.metrics}, indent=2) + "\n")


def _load_picture_vae(work: Path):  # noqa: ANN202 - diffusers type imported lazily
    from diffusers import AutoencoderKL

    path = work / "picture-vae" / "exported"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: train the picture VAE first (`--part picture-vae`)")
    return AutoencoderKL.from_pretrained(str(path))


def run_picture_vae(data: Path, work: Path, steps: int, seed: int, progress: bool) -> PartResult:
    """Encoder and decoder together, then the decoder alone (``vae_decoder``; ``steps`` scales both phases).
    Both decoders' UNets train on the latents of the encoder, which the second phase leaves as it is."""
    from services.world.pretrain.decoders import pretrain_picture_vae
    from services.world.pretrain.vae_decoder import DECODER_PHASE, refine_decoder

    folder = work / "picture-vae"
    vae = pretrain_picture_vae(read_world(data, ("image", "video")), LoopConfig(steps=steps, lr=1e-3, seed=seed),
                               folder, progress=progress)
    loop = dataclasses.replace(DECODER_PHASE.loop, seed=seed,
                               steps=max(1, DECODER_PHASE.loop.steps * steps // DEFAULT_STEPS["picture-vae"]))
    vae = refine_decoder(vae, dataclasses.replace(DECODER_PHASE, loop=loop), folder / "decoder", progress=progress)
    vae.save_pretrained(str(folder / "exported"), safe_serialization=True)
    return PartResult("picture-vae", folder / "exported", {"scaling_factor": float(vae.config.scaling_factor)})


def _clip_and_unet(steps: int, seed: int, unet_factor: int) -> dict[str, LoopConfig]:
    # The contrastive binding is cheap (one small tower, a few dozen captions: about a tenth of the UNet's time).
    return {"clip": LoopConfig(steps=steps, lr=1e-3, warmup=10, seed=seed),
            "unet": LoopConfig(steps=steps * unet_factor, lr=5e-4, seed=seed)}


# 1200 steps drew colour (100%) and size but squares still came out round (shape 56%); 2400 steps 77.1%, 4800
# steps 95.8% (48 fresh captions, `nextgpt world eval --part image`; 144 captions: 79.9% -> 91.0%).
IMAGE_UNET_FACTOR = 4


def run_image(data: Path, work: Path, steps: int, seed: int, progress: bool) -> PartResult:
    from services.world.pretrain.decoders import pretrain_image

    folder = work / "image"
    pretrain_image(read_world(data, ("image",))["image"], _load_picture_vae(work),
                   _clip_and_unet(steps, seed, IMAGE_UNET_FACTOR),
                   folder, folder / "exported", progress=progress)
    return PartResult("image", folder / "exported", {})


# On SD's schedule the clip UNet never drew motion (31% at 1200 and 2400 steps, chance is 25%: it read direction
# from the clean latent's leak at t=999, see decoders.ZERO_SNR). At zero terminal SNR: 1200 steps 45.8%, 2400
# steps 93.8% (48 fresh captions, `nextgpt world eval --part video`).
VIDEO_UNET_FACTOR = 4


def run_video(data: Path, work: Path, steps: int, seed: int, progress: bool) -> PartResult:
    from services.world.pretrain.decoders import pretrain_video

    folder = work / "video"
    pretrain_video(read_world(data, ("video",))["video"], _load_picture_vae(work),
                   _clip_and_unet(steps, seed, VIDEO_UNET_FACTOR),
                   folder, folder / "exported", progress=progress)
    return PartResult("video", folder / "exported", {})


# A UNet of 600 steps drew the band it was asked for from most noise seeds but not all (pitch 91.7% from
# captions; through the LLM the same conditioning gave the wrong band for the same seeds, whatever the wording).
AUDIO_UNET_FACTOR = 3


def run_audio(data: Path, work: Path, steps: int, seed: int, progress: bool) -> PartResult:
    from services.world.pretrain.decoders import pretrain_audio

    folder = work / "audio"
    # The VAE, vocoder and CLAP tower learn tones quickly; the UNet gets AUDIO_UNET_FACTOR times the step budget.
    cfgs = {"vae": LoopConfig(steps=max(1, steps // 3), lr=1e-3, seed=seed),
            "vocoder": LoopConfig(steps=max(1, steps // 2), lr=1e-3, seed=seed),
            "clap": LoopConfig(steps=max(1, steps // 3), lr=1e-3, warmup=10, seed=seed),
            "unet": LoopConfig(steps=steps * AUDIO_UNET_FACTOR, lr=5e-4, seed=seed)}
    pretrain_audio(read_world(data, ("audio",))["audio"], cfgs, folder, folder / "exported", progress=progress)
    return PartResult("audio", folder / "exported", {})




def run_language(data: Path, work: Path, steps: int, seed: int, progress: bool) -> PartResult:
    from services.world.pretrain.language import pretrain_language

    folder = work / "language"
    pretrain_language(LoopConfig(steps=steps, lr=2e-3, seed=seed), folder, folder / "exported", progress=progress)
    return PartResult("language", folder / "exported", {})


Part = Callable[[Path, Path, int, int, bool], PartResult]
# In the order `--part all` runs them (the picture VAE before the two decoders that share it).
PARTS: dict[str, Part] = {
    "imagebind": run_imagebind, "language": run_language, "picture-vae": run_picture_vae, "image": run_image,
    "audio": run_audio, "video": run_video,
}
# Sized for a 2-core CPU (minutes per part in the README); a GPU can afford more. The imagebind part's is its
# recipe's total (phases 1-7), which --steps scales.
DEFAULT_STEPS = {"imagebind": 7100, "language": 3000, "picture-vae": 300, "image": 1200, "audio": 600, "video": 600}
