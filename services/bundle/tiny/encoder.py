"""Tiny ImageBind (real architecture, 1024-d shared space as in the release) plus the input projection."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from services.bundle.tensor_io import save_state_dict
from services.contracts.bundle_manifest import ImageBindConfig
from services.modeling.imagebind import build_imagebind

TINY_IMAGEBIND = ImageBindConfig(
    out_embed_dim=1024,
    vision_embed_dim=64, vision_num_blocks=2, vision_num_heads=4,
    text_embed_dim=64, text_num_blocks=1, text_num_heads=4,
    audio_embed_dim=64, audio_num_blocks=2, audio_num_heads=4,
    depth_embed_dim=32, depth_num_blocks=1, depth_num_heads=4,
    thermal_embed_dim=32, thermal_num_blocks=1, thermal_num_heads=4,
    imu_embed_dim=32, imu_num_blocks=1, imu_num_heads=4,
    audio_drop_path=0.0, imu_drop_path=0.0,
)


def build_encoder(out_dir: Path, llm_hidden: int, seed: int) -> ImageBindConfig:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed + 2)
    save_state_dict(build_imagebind(TINY_IMAGEBIND), out_dir / "imagebind.safetensors")
    projection = nn.Linear(TINY_IMAGEBIND.out_embed_dim, llm_hidden)
    save_state_dict(projection, out_dir / "input_projection.safetensors")
    return TINY_IMAGEBIND
