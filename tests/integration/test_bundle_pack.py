"""`nextgpt bundle pack`: the same bundle with float16 weights, about half the size, computing the same answers."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from services.bundle.pack import pack_half
from services.modeling.projector import OutputProjector


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.safetensors"))


def test_packed_bundle_is_half_the_size_and_computes_alike(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    packed = pack_half(tiny_bundle_dir, tmp_path / "packed")
    assert _size(packed.root) < 0.55 * _size(tiny_bundle_dir)
    for path in packed.root.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            assert all(fh.get_slice(k).get_dtype() in ("F16", "I64") for k in fh.keys()), path
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    logits = [LlamaForCausalLM.from_pretrained(str(root / "llm"), dtype=torch.float32)(ids).logits
              for root in (tiny_bundle_dir, packed.root)]
    assert torch.allclose(logits[0], logits[1], atol=2e-2)
    spec = packed.manifest.outputs["image"].projector
    hidden = torch.randn(1, 4, spec.in_dim)
    outs = []
    for root in (tiny_bundle_dir, packed.root):
        projector = OutputProjector(spec)
        projector.load_state_dict(load_file(str(root / spec.weights)))
        rows = load_file(str(root / spec.signal_embeddings))["signal_input_embeddings"].float()
        outs.append(projector.eval()(hidden, rows))
    assert torch.allclose(outs[0], outs[1], atol=2e-2)
