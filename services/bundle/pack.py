"""Store a bundle's weights at half precision: every floating-point tensor of every safetensors file becomes
float16 (the services cast to their compute dtype when they load, so nothing else changes). Halves the size of
a bundle meant to be committed or shipped."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.bundle.loader import Bundle, load_bundle
from services.bundle.staging import staged_output


def _halve(path: Path) -> None:
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    halved = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(halved, str(path), metadata=metadata)


def pack_half(source: Path, out: Path, force: bool = False) -> Bundle:
    load_bundle(source)  # refuse to pack an invalid bundle
    with staged_output(out, force=force) as root:
        shutil.copytree(source, root, dirs_exist_ok=True)
        for path in sorted(root.rglob("*.safetensors")):
            _halve(path)
    return load_bundle(out)
