"""The encoder model against ImageBind's own forward and the formulas; the huge checkpoint layout loads."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file

from services.bundle.loader import load_bundle
from services.contracts.bundle_manifest import ImageBindConfig
from services.contracts.encoder import MediaInput
from services.contracts.settings import EncoderSettings
from services.encoder.compose import build_encoder_service
from services.encoder.model import EncoderModel
from services.encoder.preprocess.audio import preprocess_audio
from services.encoder.preprocess.image import preprocess_image
from services.encoder.preprocess.video import preprocess_video
from services.encoder.serving import EncoderService
from services.modeling.imagebind import imagebind_without_weights, modality_types
from tests.support import media


@pytest.fixture(scope="module")
def model(tiny_bundle_dir: Path) -> EncoderModel:
    return EncoderModel.from_bundle(load_bundle(tiny_bundle_dir))


def test_vision_and_video_equal_imagebind_forward(model: EncoderModel) -> None:
    types = modality_types()
    image = preprocess_image(media.png(), "a.png", 10**8)[None]
    video = preprocess_video(media.mp4(pattern="noise"), "v.mp4", 60, 10**8)[None]
    with torch.no_grad():
        ref_image = model.imagebind({types.VISION: image})[types.VISION]
        ref_video = model.imagebind({types.VISION: video})[types.VISION]
    assert torch.allclose(model.embed("image", image), ref_image, atol=1e-6)
    assert torch.allclose(model.embed("video", video), ref_video, atol=1e-6)
    assert torch.allclose(ref_image.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert float(ref_video.norm()) < 1.0  # averaged after normalisation, not renormalised


def test_audio_is_normalised_without_the_x20_scale(model: EncoderModel) -> None:
    types = modality_types()
    audio = preprocess_audio(media.wav(seconds=5), "a.wav", 60)[None]
    with torch.no_grad():
        upstream = model.imagebind({types.AUDIO: audio})[types.AUDIO]
    ours = model.embed("audio", audio)
    assert torch.allclose(ours * 20, upstream, atol=1e-5)


def test_projection_is_llama_proj(model: EncoderModel, tiny_bundle_dir: Path) -> None:
    state = load_file(str(tiny_bundle_dir / "encoder" / "input_projection.safetensors"))
    x = torch.randn(3, 1024)
    assert torch.allclose(model.project(list(x))[:, 0], x @ state["weight"].T + state["bias"], atol=1e-5)


def test_huge_checkpoint_key_names_load() -> None:
    # Names and shapes of the released imagebind_huge.pth, written out here from its layout.
    huge = {
        "modality_preprocessors.vision.rgbt_stem.proj.1.weight": (1280, 3, 2, 14, 14),
        "modality_preprocessors.vision.pos_embedding_helper.pos_embed": (1, 257, 1280),
        "modality_preprocessors.audio.rgbt_stem.proj.weight": (768, 1, 16, 16),
        "modality_preprocessors.audio.pos_embedding_helper.pos_embed": (1, 229, 768),
        "modality_preprocessors.text.token_embedding.weight": (49408, 1024),
        "modality_trunks.vision.blocks.31.attn.in_proj_weight": (3840, 1280),
        "modality_trunks.vision.blocks.31.mlp.fc1.weight": (5120, 1280),
        "modality_trunks.audio.blocks.11.attn.in_proj_weight": (2304, 768),
        "modality_trunks.text.blocks.23.attn.in_proj_weight": (3072, 1024),
        "modality_heads.vision.2.weight": (1024, 1280),
        "modality_heads.audio.2.weight": (1024, 768),
        "modality_postprocessors.text.1.log_logit_scale": (),
    }
    model = imagebind_without_weights(ImageBindConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in huge.items():
        assert shapes.get(key) == shape, key
    assert 1.19e9 < sum(p.numel() for p in model.parameters()) < 1.21e9
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    model.load_state_dict(state, strict=True, assign=True)


async def _service(tiny_bundle_dir: Path, **overrides: object) -> EncoderService:
    settings = EncoderSettings(**overrides)  # type: ignore[arg-type]
    service = build_encoder_service(load_bundle(tiny_bundle_dir), settings, CollectorRegistry())
    await service.start()
    return service


async def test_batched_equals_unbatched(tiny_bundle_dir: Path) -> None:
    files = [media.png(seed=i) for i in range(4)] + [media.wav(seconds=2 + i, seed=i) for i in range(4)]
    names = [f"f{i}" for i in range(len(files))]
    results = {}
    for max_batch in (1, 8):
        service = await _service(tiny_bundle_dir, max_batch=max_batch, max_wait_ms=50)
        try:
            outs = await asyncio.gather(*(service.encode([MediaInput(name=n, data=d)]) for n, d in zip(names, files)))
        finally:
            await service.stop()
        results[max_batch] = np.concatenate([o.embeddings for o in outs])
    assert np.allclose(results[1], results[8], atol=1e-5)


async def test_segments_are_summed(tiny_bundle_dir: Path) -> None:
    service = await _service(tiny_bundle_dir)
    try:
        a, b = MediaInput(name="a", data=media.png(seed=1)), MediaInput(name="b", data=media.png(seed=2))
        single = await service.encode([a, b])
        summed = await service.encode([a, b], segments=[["a", "b"]])
    finally:
        await service.stop()
    assert single.embeddings.shape == (2, 128) and summed.embeddings.shape == (1, 128)
    assert np.allclose(summed.embeddings[0], single.embeddings.sum(axis=0), atol=1e-5)
    assert summed.modalities == ["image"]
