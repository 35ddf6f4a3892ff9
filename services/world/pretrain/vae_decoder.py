"""The picture VAE, phase 2: its decoder learns to draw what the encoder's latents hold.

The picture VAE (one for pictures and clip frames) trains 300 steps, encoder and decoder together. That left the
encoder's latents holding a small shape's outline, and its decoder not drawing it: a small square came back with
rounded corners and a notch in its top edge, and a small circle lumpy. Through the VAE and back, a fresh small
shape measured its shape 35 times in 51; and the picture model's own small squares, drawn from a caption through
the served pipeline, were read back by the bundle's encoder as a triangle or a circle 5 times in 8 ("Draw a red
square.", then "What is in this picture?": "A small red triangle.").

This phase trains the decoder alone (with its post-quant conv) on the encoder's latent means, by the
reconstruction's mean squared error, on fresh pictures and clip frames (``DECODER_SEED``, never an evaluation
seed). The encoder does not change, so neither do the latents the picture and clip UNets learnt nor the
``scaling_factor``: nothing trained over this VAE needs retraining, and a bundle made before this phase existed
gains it in place (``refine_bundle_vae``). An Adam rate of 1e-3 (the joint phase's) made the loss climb; 2e-4
halves it in 400 steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from services.world.pretrain.loop import LoopConfig, device, local_shard, train_part
from services.world.render import render_image, render_video

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

log = logging.getLogger(__name__)

DECODER_SEED = 9_000_001
WEIGHTS = "diffusion_pytorch_model.safetensors"
# A bundle refined in place (``nextgpt world vae-decoder``) says so in its manifest's version.
TAG = "+vae-decoder"


@dataclass(frozen=True)
class DecoderPhase:
    loop: LoopConfig
    batch_size: int = 32  # half pictures, half clip frames, all processes together


DECODER_PHASE = DecoderPhase(LoopConfig(steps=400, lr=2e-4, warmup=50))


def fresh_pictures(generator: torch.Generator, count: int) -> torch.Tensor:
    """This process's share of ``count`` fresh world pictures and clip frames, as (n, 3, 64, 64) in [-1, 1]."""
    from services.world.pretrain.decoders import picture_tensor

    pictures = []
    for k, index in enumerate(local_shard(torch.randint(2**31 - 1, (count,), generator=generator)).tolist()):
        if k % 2:
            pictures.append(render_image(DECODER_SEED, index).data)
        else:
            frames = render_video(DECODER_SEED, index).data
            pictures.append(frames[index % len(frames)])
    return picture_tensor(np.stack(pictures))


def refine_decoder(vae: AutoencoderKL, phase: DecoderPhase, workdir: Path, progress: bool = True) -> AutoencoderKL:
    """Train ``vae``'s decoder (and post-quant conv) on its frozen encoder's latent means; resumes from
    ``workdir``."""
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)

    def step_loss(generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = fresh_pictures(generator, phase.batch_size).to(device())
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mean
        return {"recon": F.mse_loss(vae.decode(latents).sample, x)}

    train_part("picture-vae decoder", vae, step_loss, phase.loop, workdir, progress=progress)
    vae.requires_grad_(True)
    return vae.eval()


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def refine_bundle_vae(bundle_dir: Path, work: Path, steps: int | None = None, seed: int = 0,
                      progress: bool = True) -> list[Path]:
    """Run this phase on a bundle's picture VAE (its image decoder's) and write it back, to the clip decoder's too
    where that is the same VAE (as ``nextgpt world pretrain`` makes them). Resumes from ``work``. Returns the VAE
    folders written."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from services.bundle.loader import load_bundle
    from services.bundle.tensor_io import save_state_dict
    from services.bundle.manifest_io import tag_version

    bundle = load_bundle(bundle_dir)
    folders = {m: bundle.path(out.decoder.source) / "vae" for m, out in bundle.manifest.outputs.items()
               if m in ("image", "video")}
    if "image" not in folders or not folders["image"].is_dir():
        raise ValueError(f"{bundle_dir}: no picture VAE (the image decoder's 'vae' folder) to refine")
    shared = _digest(folders["image"])
    targets = [f for m, f in sorted(folders.items()) if m == "image" or (f.is_dir() and _digest(f) == shared)]
    if len(targets) < len(folders):
        log.info("the clip decoder has a VAE of its own; it is left as it is")
    # A packed bundle keeps fp16 weights (from_pretrained reads them as fp32): trained in fp32, written back as kept.
    kept_in = next(iter(load_file(str(folders["image"] / WEIGHTS)).values())).dtype
    vae = AutoencoderKL.from_pretrained(str(folders["image"]))
    loop = dataclasses.replace(DECODER_PHASE.loop, steps=steps or DECODER_PHASE.loop.steps, seed=seed)
    vae = refine_decoder(vae, dataclasses.replace(DECODER_PHASE, loop=loop), work, progress=progress)
    staged = work / "exported" / WEIGHTS
    save_state_dict({k: v.to(kept_in) for k, v in vae.state_dict().items()}, staged, metadata={"format": "pt"})
    for folder in targets:  # the weights alone (the config is the same); whole or not at all: a copy, then a rename
        shutil.copyfile(staged, folder / f".{WEIGHTS}.tmp")
        os.replace(folder / f".{WEIGHTS}.tmp", folder / WEIGHTS)
    tag_version(bundle.root, bundle.manifest, TAG)
    return targets
