"""The three output projectors at reduced width, plus the signal tokens' input-embedding rows."""

from __future__ import annotations

from pathlib import Path

import torch

from services.bundle.tensor_io import save_state_dict
from services.contracts.bundle_manifest import ProjectorSpec
from services.modeling.projector import OutputProjector

# Conditioning widths of the tiny decoders; distinct so that a modality mix-up fails on shape.
TINY_OUT_DIMS = {"image": 32, "video": 48, "audio": 24}
# 77 queries like the release (the CLIP text length); audio is one pooled CLAP vector.
NUM_QUERIES = {"image": 77, "video": 77, "audio": 1}


def projector_spec(modality: str, in_dim: int, out_dims: dict[str, int] = TINY_OUT_DIMS) -> ProjectorSpec:
    return ProjectorSpec(
        weights=f"projectors/{modality}.safetensors",
        signal_embeddings=f"projectors/{modality}.signal_embeddings.safetensors",
        in_dim=in_dim, hidden_dim=64, num_heads=4, num_encoder_layers=4, num_decoder_layers=4, ffn_dim=128,
        num_queries=NUM_QUERIES[modality], out_dim=out_dims[modality],
    )


def build_projector(bundle_dir: Path, spec: ProjectorSpec, signal_rows: torch.Tensor, seed: int) -> None:
    torch.manual_seed(seed)
    (bundle_dir / spec.weights).parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(OutputProjector(spec), bundle_dir / spec.weights)
    save_state_dict({"signal_input_embeddings": signal_rows}, bundle_dir / spec.signal_embeddings)
