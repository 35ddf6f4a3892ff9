from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.contracts.bundle_manifest import ProjectorSpec, SignalSpec


def _projector(**kw: int) -> ProjectorSpec:
    base = dict(weights="p.safetensors", signal_embeddings="s.safetensors", in_dim=4096, hidden_dim=512,
                num_heads=4, num_encoder_layers=4, num_decoder_layers=4, ffn_dim=2048, num_queries=77, out_dim=768)
    base.update(kw)
    return ProjectorSpec(**base)  # type: ignore[arg-type]


def test_release_projector_shapes() -> None:
    assert _projector().output_shape == (77, 768)
    assert _projector(num_queries=1, out_dim=512).output_shape == (512,)


def test_heads_must_divide_width() -> None:
    with pytest.raises(ValidationError, match="not divisible"):
        _projector(num_heads=3)


def test_signal_tokens_and_ids_must_pair() -> None:
    with pytest.raises(ValidationError, match="2 tokens but 1 token_ids"):
        SignalSpec(tokens=["[IMG0]", "[IMG1]"], token_ids=[5])
    with pytest.raises(ValidationError, match="distinct"):
        SignalSpec(tokens=["[IMG0]", "[IMG1]"], token_ids=[5, 5])
