"""Writing tensors into a bundle (safetensors only: no pickles in a bundle)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def save_state_dict(module_or_state: nn.Module | dict[str, torch.Tensor], path: Path,
                    metadata: dict[str, str] | None = None) -> None:
    """Save as safetensors; tensors that share storage are cloned (safetensors refuses shared storage).
    ``metadata``: the header's (``{"format": "pt"}``, as diffusers and transformers write theirs)."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
