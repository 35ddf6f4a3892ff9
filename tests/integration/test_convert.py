"""``bundle convert`` on a tiny synthetic release: the real key names and layout, scaled-down shapes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.bundle.convert import ConvertOptions, convert_release
from services.bundle.loader import load_bundle
from services.bundle.release import add_release_tokens, added_tokens
from services.bundle.tiny.encoder import TINY_IMAGEBIND
from services.bundle.tiny.text_tokenizers import build_base_tokenizer
from services.contracts.bundle_manifest import ProjectorSpec
from services.contracts.errors import BundleError
from services.modeling.imagebind import build_imagebind
from services.modeling.projector import OutputProjector

HIDDEN, LAYERS, RANK = 128, 2, 4
OUT_DIMS = {"image": 32, "video": 48, "audio": 24}
QUERIES = {"image": 77, "video": 77, "audio": 1}
PREFIX = {"image": "gen_text_hidden_fcs.0.", "video": "gen_text_hidden_fcs_video.0.",
          "audio": "gen_text_hidden_fcs_audio.0."}


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Writes what a user downloads: a Vicuna dir, pytorch_model.pt with the release's keys, ImageBind .pth."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(1)
    tok = build_base_tokenizer(seed=5)
    base_vocab = len(tok)
    vicuna = LlamaForCausalLM(LlamaConfig(
        vocab_size=base_vocab, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    ))
    vicuna.save_pretrained(root / "vicuna")
    tok.save_pretrained(root / "vicuna")

    vocab = base_vocab + 38
    state: dict[str, torch.Tensor] = {
        "llama_model.base_model.model.model.embed_tokens.weight": torch.randn(vocab, HIDDEN),
        "llama_model.base_model.model.lm_head.weight": torch.randn(vocab, HIDDEN),
        "llama_proj.weight": torch.randn(HIDDEN, 1024),
        "llama_proj.bias": torch.randn(HIDDEN),
    }
    for layer in range(LAYERS):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            base = f"llama_model.base_model.model.model.layers.{layer}.self_attn.{proj}"
            state[f"{base}.lora_A.default.weight"] = torch.randn(RANK, HIDDEN) * 0.1
            state[f"{base}.lora_B.default.weight"] = torch.randn(HIDDEN, RANK) * 0.1
    for modality, prefix in PREFIX.items():
        spec = ProjectorSpec(weights="x", signal_embeddings="y", in_dim=HIDDEN, hidden_dim=64, num_heads=4,
                             num_encoder_layers=4, num_decoder_layers=4, ffn_dim=128,
                             num_queries=QUERIES[modality], out_dim=OUT_DIMS[modality])
        for key, value in OutputProjector(spec).state_dict().items():
            state[prefix + key] = value.clone()
    ckpt = root / "7b_tiva_v0"
    ckpt.mkdir()
    torch.save(state, ckpt / "pytorch_model.pt")
    (ckpt / "added_tokens.json").write_text(json.dumps({t: base_vocab + i for i, t in enumerate(added_tokens())}))

    imagebind = build_imagebind(TINY_IMAGEBIND).state_dict()
    torch.save(imagebind, root / "imagebind_huge.pth")
    return {"root": root, "state": state, "imagebind": imagebind, "base_vocab": base_vocab}


def _options(release: dict[str, object], tiny_bundle_dir: Path, out: Path, **kw: object) -> ConvertOptions:
    root: Path = release["root"]  # type: ignore[assignment]
    return ConvertOptions(
        checkpoint_dir=root / "7b_tiva_v0", vicuna_dir=root / "vicuna", imagebind=root / "imagebind_huge.pth",
        out=out, decoders={m: str(tiny_bundle_dir / "decoders" / m) for m in ("image", "video", "audio")},
        imagebind_config=TINY_IMAGEBIND, progress=False, **kw,  # type: ignore[arg-type]
    )


def test_merge_exports_every_tensor_exactly(release: dict[str, object], tiny_bundle_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    state: dict[str, torch.Tensor] = release["state"]  # type: ignore[assignment]
    manifest = convert_release(_options(release, tiny_bundle_dir, tmp_path / "b"))
    bundle = load_bundle(tmp_path / "b")
    llm = load_file(str(bundle.path("llm/model.safetensors")))
    assert torch.equal(llm["model.embed_tokens.weight"], state["llama_model.base_model.model.model.embed_tokens.weight"])
    assert torch.equal(llm["lm_head.weight"], state["llama_model.base_model.model.lm_head.weight"])
    vicuna = LlamaForCausalLM.from_pretrained(release["root"] / "vicuna")  # type: ignore[operator]
    for layer in range(LAYERS):
        for proj in ("q_proj", "v_proj"):
            base = f"llama_model.base_model.model.model.layers.{layer}.self_attn.{proj}"
            a, b = state[f"{base}.lora_A.default.weight"], state[f"{base}.lora_B.default.weight"]
            original = getattr(vicuna.model.layers[layer].self_attn, proj).weight
            expected = original + (32 / RANK) * (b @ a)
            merged = llm[f"model.layers.{layer}.self_attn.{proj}.weight"]
            assert torch.allclose(merged, expected, atol=1e-6)
    proj = load_file(str(bundle.path("encoder/input_projection.safetensors")))
    assert torch.equal(proj["weight"], state["llama_proj.weight"]) and torch.equal(proj["bias"], state["llama_proj.bias"])
    for modality, prefix in PREFIX.items():
        spec = manifest.outputs[modality]
        exported = load_file(str(bundle.path(spec.projector.weights)))
        originals = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        assert exported.keys() == originals.keys()
        assert all(torch.equal(exported[k], originals[k]) for k in originals)
        rows = load_file(str(bundle.path(spec.projector.signal_embeddings)))["signal_input_embeddings"]
        embed = state["llama_model.base_model.model.model.embed_tokens.weight"]
        assert torch.equal(rows, embed[spec.signal.token_ids])
        assert spec.projector.output_shape == ((OUT_DIMS[modality],) if QUERIES[modality] == 1
                                               else (77, OUT_DIMS[modality]))
    imagebind = load_file(str(bundle.path("encoder/imagebind.safetensors")))
    reference: dict[str, torch.Tensor] = release["imagebind"]  # type: ignore[assignment]
    assert imagebind.keys() == reference.keys() and all(torch.equal(imagebind[k], reference[k]) for k in reference)
    base_vocab: int = release["base_vocab"]  # type: ignore[assignment]
    assert manifest.prompt.media_start_id == base_vocab and manifest.outputs["audio"].signal.token_ids[-1] == base_vocab + 37
    assert manifest.llm.loras == [] and manifest.llm.vocab_size == base_vocab + 38


def test_adapter_mode_equals_merged(release: dict[str, object], tiny_bundle_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    convert_release(_options(release, tiny_bundle_dir, tmp_path / "merged"))
    manifest = convert_release(_options(release, tiny_bundle_dir, tmp_path / "adapter", lora="adapter"))
    assert manifest.llm.default_lora == "nextgpt" and manifest.llm.loras[0].rank == RANK
    ids = torch.tensor([[1, 7, 42, 99, release["base_vocab"]]])  # type: ignore[list-item]
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged" / "llm").eval()
    base = LlamaForCausalLM.from_pretrained(tmp_path / "adapter" / "llm").eval()
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter" / "lora" / "nextgpt").eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def _bad_release(release: dict[str, object], tmp_path: Path, edit: object) -> Path:
    state = dict(release["state"])  # type: ignore[call-overload]
    edit(state)  # type: ignore[operator]
    bad = tmp_path / "bad_ckpt"
    bad.mkdir()
    torch.save(state, bad / "pytorch_model.pt")
    return bad


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.__setitem__("llama_model.base_model.model.model.norm.weight", torch.ones(HIDDEN)),
         "unused keys: llama_model.base_model.model.model.norm.weight"),
        (lambda s: s.pop("llama_proj.bias"), "missing llama_proj.bias"),
        (lambda s: s.pop("llama_model.base_model.model.model.layers.1.self_attn.o_proj.lora_B.default.weight"),
         "missing LoRA B for layer 1 o_proj"),
        (lambda s: [s.pop(k) for k in list(s) if k.startswith("gen_text_hidden_fcs_audio.0.")],
         "missing the audio projector"),
        (lambda s: s.__setitem__("gen_text_hidden_fcs.0.extra.weight", torch.ones(2)), "unused"),
    ],
)
def test_unaccounted_keys_are_errors(release: dict[str, object], tiny_bundle_dir: Path, tmp_path: Path,
                                     edit: object, message: str) -> None:
    opts = replace(_options(release, tiny_bundle_dir, tmp_path / "out"), checkpoint_dir=_bad_release(release, tmp_path, edit))
    with pytest.raises(BundleError) as info:
        convert_release(opts)
    assert message in info.value.message
    assert not (tmp_path / "out").exists(), "a failed conversion must not leave a bundle behind"


def test_wrong_imagebind_is_refused(release: dict[str, object], tiny_bundle_dir: Path, tmp_path: Path) -> None:
    state = dict(release["imagebind"])  # type: ignore[call-overload]
    state.pop("modality_heads.vision.2.weight")
    torch.save(state, tmp_path / "ib.pth")
    opts = replace(_options(release, tiny_bundle_dir, tmp_path / "out"), imagebind=tmp_path / "ib.pth")
    with pytest.raises(BundleError, match="missing \\['modality_heads.vision.2.weight'\\]"):
        convert_release(opts)


def test_vocab_mismatch_is_refused(release: dict[str, object], tiny_bundle_dir: Path, tmp_path: Path) -> None:
    def grow(s: dict[str, torch.Tensor]) -> None:
        for key in ("llama_model.base_model.model.model.embed_tokens.weight", "llama_model.base_model.model.lm_head.weight"):
            s[key] = torch.cat([s[key], torch.zeros(1, HIDDEN)])

    opts = replace(_options(release, tiny_bundle_dir, tmp_path / "out"), checkpoint_dir=_bad_release(release, tmp_path, grow))
    with pytest.raises(BundleError, match="checkpoint embeddings have"):
        convert_release(opts)


def test_hub_decoders_are_recorded_not_fetched(release: dict[str, object], tiny_bundle_dir: Path, tmp_path: Path) -> None:
    opts = replace(_options(release, tiny_bundle_dir, tmp_path / "hub"), decoders={})
    manifest = convert_release(opts)
    assert manifest.outputs["image"].decoder.source == "hub:stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert manifest.outputs["video"].decoder.defaults.frames == 24
    assert not (tmp_path / "hub" / "decoders").exists()


def test_release_tokens_added_as_plain_tokens() -> None:
    tok = build_base_tokenizer(seed=5)
    add_release_tokens(tok)
    assert all(not t.special for t in tok.added_tokens_decoder.values() if t.content in added_tokens())
