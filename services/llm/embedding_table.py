"""The LLM's input-embedding table alone (no model): what a remote backend needs to build prompt embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight")


def load_embedding_table(llm_dir: Path) -> torch.Tensor:
    index = llm_dir / "model.safetensors.index.json"
    files = [llm_dir / "model.safetensors"]
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [llm_dir / weight_map[n] for n in _NAMES if n in weight_map][:1]
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in _NAMES:
                if name in handle.keys():
                    return handle.get_tensor(name).float()
    raise FileNotFoundError(f"{llm_dir}: no input embedding table ({' or '.join(_NAMES)})")
