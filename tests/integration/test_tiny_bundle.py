"""The tiny bundle: real architectures, loadable through the same code paths as the real weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from services.bundle.loader import Bundle, load_bundle
from services.bundle.tiny.build import build_tiny_bundle
from services.bundle.release import added_tokens
from services.modeling.imagebind import build_imagebind, modality_types
from services.modeling.projector import OutputProjector


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir: Path) -> Bundle:
    return load_bundle(tiny_bundle_dir)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    build_tiny_bundle(tmp_path / "a", seed=3)
    build_tiny_bundle(tmp_path / "b", seed=3)
    build_tiny_bundle(tmp_path / "c", seed=4)
    a, b, c = (_digests(tmp_path / n) for n in "abc")
    assert a == b
    assert a["llm/model.safetensors"] != c["llm/model.safetensors"]
    assert a["projectors/image.safetensors"] != c["projectors/image.safetensors"]


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_bundle(tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_tokenizer_has_the_release_tokens_in_order(bundle: Bundle) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundle.path("llm"))
    ids = tok.convert_tokens_to_ids(added_tokens())
    assert len(added_tokens()) == 38
    assert ids == list(range(ids[0], ids[0] + 38)), "added tokens must be contiguous, in the release's order"
    for token in added_tokens():
        assert len(tok.encode(token, add_special_tokens=False)) == 1
    m = bundle.manifest
    assert tok.convert_tokens_to_ids("###") == m.stop.token_ids[0]
    assert [m.outputs[k].signal.token_ids[0] for k in ("image", "video", "audio")] == tok.convert_tokens_to_ids(
        ["[IMG0]", "[VID0]", "[AUD0]"]
    )


def test_llm_and_lora_load_and_lora_changes_logits(bundle: Bundle) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    llm = LlamaForCausalLM.from_pretrained(bundle.path("llm")).eval()
    cfg = llm.config
    assert cfg.head_dim >= 32, "vLLM's CPU attention needs head_dim >= 32"
    assert cfg.vocab_size == bundle.manifest.llm.vocab_size
    ids = torch.tensor([[1, 5, 9, 100]])
    with torch.no_grad():
        base = llm(ids).logits
        lora = bundle.manifest.llm.loras[0]
        peft = PeftModel.from_pretrained(llm, bundle.path(lora.path)).eval()
        adapted = peft(ids).logits
    assert (adapted - base).abs().max() > 1e-3


def test_signal_embeddings_are_the_llm_rows(bundle: Bundle) -> None:
    weights = load_file(str(bundle.path("llm/model.safetensors")))["model.embed_tokens.weight"]
    for modality, spec in bundle.manifest.outputs.items():
        rows = load_file(str(bundle.path(spec.projector.signal_embeddings)))["signal_input_embeddings"]
        assert torch.equal(rows, weights[spec.signal.token_ids]), modality


def test_imagebind_loads_strict_and_embeds(bundle: Bundle) -> None:
    enc = bundle.manifest.encoder
    model = build_imagebind(enc.config)
    model.load_state_dict(load_file(str(bundle.path(enc.weights))), strict=True)
    mt = modality_types()
    with torch.no_grad():
        out = model({mt.VISION: torch.randn(2, 3, 224, 224), mt.AUDIO: torch.randn(1, 3, 1, 128, 204)})
    assert out[mt.VISION].shape == (2, 1024)
    assert out[mt.AUDIO].shape == (1, 1024)
    proj = load_file(str(bundle.path(enc.input_projection)))
    assert proj["weight"].shape == (bundle.manifest.llm.hidden_size, 1024)


def _projected(bundle: Bundle, modality: str) -> torch.Tensor:
    spec = bundle.manifest.outputs[modality]
    projector = OutputProjector(spec.projector).eval()
    projector.load_state_dict(load_file(str(bundle.path(spec.projector.weights))), strict=True)
    rows = load_file(str(bundle.path(spec.projector.signal_embeddings)))["signal_input_embeddings"]
    hidden = torch.randn(1, len(spec.signal.token_ids), bundle.manifest.llm.hidden_size)
    with torch.no_grad():
        out = projector(hidden, rows)
    assert tuple(out.shape[1:]) == spec.projector.output_shape
    return out


def test_image_conditioning_drives_the_image_pipeline(bundle: Bundle) -> None:
    from diffusers import StableDiffusionPipeline

    d = bundle.manifest.outputs["image"].decoder.defaults
    pipe = StableDiffusionPipeline.from_pretrained(bundle.decoder_source("image"))
    emb = _projected(bundle, "image")
    image = pipe(prompt_embeds=emb, num_inference_steps=2, height=d.height, width=d.width,
                 guidance_scale=d.guidance_scale, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (d.width, d.height)


def test_video_conditioning_drives_the_video_pipeline(bundle: Bundle) -> None:
    from diffusers import TextToVideoSDPipeline

    d = bundle.manifest.outputs["video"].decoder.defaults
    pipe = TextToVideoSDPipeline.from_pretrained(bundle.decoder_source("video"))
    frames = pipe(prompt_embeds=_projected(bundle, "video"), num_inference_steps=2, num_frames=4,
                  height=d.height, width=d.width, generator=torch.Generator().manual_seed(0)).frames[0]
    assert np.asarray(frames).shape == (4, d.height, d.width, 3)


def test_audio_conditioning_drives_the_audio_pipeline(bundle: Bundle) -> None:
    from diffusers import AudioLDMPipeline

    d = bundle.manifest.outputs["audio"].decoder.defaults
    pipe = AudioLDMPipeline.from_pretrained(bundle.decoder_source("audio"))
    audio = pipe(prompt_embeds=_projected(bundle, "audio"), num_inference_steps=2,
                 audio_length_in_s=d.seconds, generator=torch.Generator().manual_seed(0)).audios[0]
    assert audio.shape == (int(d.seconds * d.sample_rate),)
    assert pipe.vocoder.config.sampling_rate == d.sample_rate
