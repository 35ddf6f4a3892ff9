"""Build ImageBind's model class from the ``imagebind-unofficial`` package without its data stack.

The package's top-level ``__init__`` imports ``imagebind.data`` (torchvision, torchaudio, pytorchvideo,
which are CUDA builds here and break beside the CPU torch), and its model files import two small helpers from
timm (whose import pulls torchvision). We therefore import only ``imagebind.models`` and provide those two
helpers for the duration of that import, then take the stand-ins out of ``sys.modules`` again: diffusers
probes ``find_spec("timm")`` and fails on a module without a spec.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import threading
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.contracts.bundle_manifest import ImageBindConfig

_IMPORT_LOCK = threading.Lock()


class _DropPath(nn.Module):
    """Stochastic depth: drops whole residual branches per sample while training, identity at inference."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def _timm_stand_in() -> dict[str, types.ModuleType]:
    timm = types.ModuleType("timm")
    layers = types.ModuleType("timm.layers")
    layers.DropPath = _DropPath  # type: ignore[attr-defined]
    layers.trunc_normal_ = nn.init.trunc_normal_  # type: ignore[attr-defined]
    timm.layers = layers  # type: ignore[attr-defined]
    return {"timm": timm, "timm.layers": layers}


def imagebind_models() -> types.ModuleType:
    """Return ``imagebind.models.imagebind_model`` (imported once, thread-safe)."""
    with _IMPORT_LOCK:
        loaded = sys.modules.get("imagebind.models.imagebind_model")
        if loaded is not None:
            return loaded
        spec = importlib.util.find_spec("imagebind")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "imagebind-unofficial is not installed; install it with "
                "`pip install --no-deps imagebind-unofficial==0.1.1`"
            )
        # A package object for `imagebind` whose __init__ (and so imagebind.data) never runs.
        package = types.ModuleType("imagebind")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        stand_ins = _timm_stand_in()
        real_timm = {name: sys.modules.get(name) for name in stand_ins}
        sys.modules.setdefault("imagebind", package)
        sys.modules.update(stand_ins)
        try:
            return importlib.import_module("imagebind.models.imagebind_model")
        finally:
            for name, module in real_timm.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module


def build_imagebind(config: ImageBindConfig) -> nn.Module:
    """An ``ImageBindModel`` with random weights and the dimensions of ``config``, in eval mode."""
    module = imagebind_models()
    model: nn.Module = module.ImageBindModel(**config.model_dump())
    return model.eval()


def modality_types() -> Any:
    """ImageBind's ``ModalityType`` namespace (VISION, AUDIO, ...)."""
    return imagebind_models().ModalityType


def load_imagebind_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read the weights of an ImageBind checkpoint: the released ``.pth`` or a bundle's ``.safetensors``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def imagebind_without_weights(config: ImageBindConfig) -> nn.Module:
    """The model with its parameters on the meta device: names and shapes of ImageBind-huge's 1.2 B parameters
    without allocating them (for checking a checkpoint's layout)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build_imagebind(config)


# The branches the encoder service runs: pictures and clips through vision, sounds through audio.
SERVED_BRANCHES = ("vision", "audio")
_BRANCH_KEY = re.compile(r"^modality_(?:preprocessors|trunks|heads|postprocessors)\.([a-z]+)\.")


def served_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of the branches the encoder serves; the text, depth, thermal and IMU branches are left out."""
    return {k: v for k, v in state.items() if (m := _BRANCH_KEY.match(k)) and m.group(1) in SERVED_BRANCHES}


def load_served_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``: every weight of a served branch must be there, every key must be the model's;
    the weights of unserved branches may be absent (a bundle need not carry what it never runs)."""
    expected = model.state_dict()
    unknown = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(served_state(expected)) - set(state))
    if unknown or missing:
        raise ValueError(f"{source}: ImageBind weights do not match the configured model: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unknown {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
    model.load_state_dict(state, strict=False)


def token_features(model: nn.Module, key: str, trunk_out: torch.Tensor) -> torch.Tensor:
    """Token-level features (B, T, out_embed_dim) of a branch's trunk output: every token through the head's norm
    and projection (the pooled vector is the first token's), L2-normalised. What the ``group`` input projection
    reads; the encoder serves them and the stand-in's background phase distils them."""
    head = model.modality_heads[key]  # LayerNorm, SelectElement(0), Linear
    return torch.nn.functional.normalize(head[2](head[0](trunk_out)), dim=-1)
