"""``nextgpt bundle convert``: the released NExT-GPT checkpoint (+ Vicuna v0, ImageBind, decoders) -> bundle.

The LLM directory gets the checkpoint's full ``embed_tokens`` / ``lm_head`` (every row was trained, and the
vocabulary grew by 38 tokens), so vLLM can serve it as a plain Llama. The LoRA is merged into q/k/v/o
(``--lora merge``, the default) or written as a PEFT adapter for vLLM's ``--enable-lora``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from services.bundle.checkpoint import CheckpointError, ReleaseCheckpoint, split_checkpoint
from services.bundle.loader import load_bundle
from services.bundle.manifest_io import write_manifest
from services.bundle.release import (
    DECODER_DEFAULTS,
    DECODER_HUB_IDS,
    GENERATION_DEFAULTS,
    LORA_ALPHA,
    LORA_TARGETS,
    MEDIA_END,
    MEDIA_START,
    PROJECTOR_HEADS,
    STOP_STRING,
    add_release_tokens,
    signal_tokens,
)
from services.bundle.staging import staged_output
from services.bundle.tensor_io import save_state_dict
from services.contracts.bundle_manifest import (
    BUNDLE_SCHEMA_VERSION,
    OUTPUT_MODALITIES,
    PIPELINE_FOR_MODALITY,
    BundleManifest,
    DecoderSpec,
    EncoderSpec,
    ImageBindConfig,
    LLMSpec,
    LoraSpec,
    Modality,
    OutputSpec,
    ProjectorSpec,
    PromptSpec,
    SignalSpec,
    StopSpec,
)
from services.contracts.errors import BundleError
from services.modeling.imagebind import imagebind_without_weights, load_imagebind_state_dict
from services.modeling.projector import OutputProjector


@dataclass(frozen=True)
class ConvertOptions:
    checkpoint_dir: Path
    vicuna_dir: Path
    imagebind: Path
    out: Path
    decoders: dict[str, str]  # modality -> local pipeline dir or hub id
    lora: Literal["merge", "adapter"] = "merge"
    lora_alpha: float = LORA_ALPHA
    imagebind_config: ImageBindConfig = ImageBindConfig()
    projector_heads: int = PROJECTOR_HEADS
    hidden_state_offset: Literal[-1, 0] = -1
    name: str = "nextgpt-7b-tiva-v0"
    version: str = "v0"
    force: bool = False
    progress: bool = True


def _fail(message: str, code: str = "convert_failed") -> BundleError:
    return BundleError(message, code=code)


def convert_release(opts: ConvertOptions) -> BundleManifest:
    ckpt_path = opts.checkpoint_dir / "pytorch_model.pt"
    if not ckpt_path.is_file():
        raise _fail(f"{ckpt_path}: checkpoint not found", "checkpoint_missing")
    for modality in opts.decoders:
        if modality not in OUTPUT_MODALITIES:
            raise _fail(f"unknown decoder modality {modality!r}")

    with staged_output(opts.out, force=opts.force) as root, \
            tqdm(total=4, desc="convert", unit="step", disable=not opts.progress) as bar:
        bar.set_postfix_str("read checkpoint")
        ckpt = _read_checkpoint(ckpt_path, opts.vicuna_dir)
        bar.update()
        bar.set_postfix_str("tokenizer + LLM")
        llm = _write_llm(root, opts, ckpt)
        bar.update()
        bar.set_postfix_str("ImageBind")
        _write_encoder(root, opts, ckpt)
        bar.update()
        bar.set_postfix_str("projectors + decoders")
        outputs = _write_outputs(root, opts, ckpt, llm)
        bar.update()
        manifest = _manifest(opts, llm, outputs)
        write_manifest(root, manifest)
        load_bundle(root)  # the same validation every service runs at start-up
    return manifest


def _read_checkpoint(path: Path, vicuna_dir: Path) -> ReleaseCheckpoint:
    config = json.loads((vicuna_dir / "config.json").read_text())
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise _fail(f"{path}: expected a state dict, found {type(state).__name__}", "checkpoint_invalid")
    try:
        return split_checkpoint(state, int(config["num_hidden_layers"]))
    except CheckpointError as exc:
        raise _fail(f"{path}: {exc}", "checkpoint_invalid") from exc


@dataclass
class _LLMResult:
    hidden_size: int
    vocab_size: int
    max_model_len: int
    ids: dict[str, int]
    bos_id: int
    loras: list[LoraSpec]


def _write_llm(root: Path, opts: ConvertOptions, ckpt: ReleaseCheckpoint) -> _LLMResult:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(opts.vicuna_dir))
    add_release_tokens(tokenizer)
    vocab = ckpt.embed_tokens.shape[0]
    if len(tokenizer) != vocab:
        raise _fail(
            f"{opts.vicuna_dir}: tokenizer has {len(tokenizer)} entries with the 38 added tokens, "
            f"checkpoint embeddings have {vocab} rows"
        )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (MEDIA_START, MEDIA_END, STOP_STRING,
                                                           *(s for m in OUTPUT_MODALITIES for s in signal_tokens(m)))}
    _check_added_tokens(opts.checkpoint_dir / "added_tokens.json", ids)

    model = LlamaForCausalLM.from_pretrained(str(opts.vicuna_dir), dtype="auto")
    hidden = model.config.hidden_size
    if ckpt.embed_tokens.shape[1] != hidden:
        raise _fail(f"checkpoint embeddings are {ckpt.embed_tokens.shape[1]} wide, the LLM is {hidden}")
    if ckpt.llama_proj_weight.shape[0] != hidden:
        raise _fail(f"llama_proj maps to {ckpt.llama_proj_weight.shape[0]}, the LLM is {hidden} wide")
    model.resize_token_embeddings(vocab)
    dtype = model.get_input_embeddings().weight.dtype
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(ckpt.embed_tokens.to(dtype))
        model.get_output_embeddings().weight.copy_(ckpt.lm_head.to(dtype))
    loras: list[LoraSpec] = []
    if opts.lora == "merge":
        _merge_lora(model, ckpt, opts.lora_alpha / ckpt.lora_rank)
    else:
        _write_adapter(root / "lora" / "nextgpt", ckpt, opts.lora_alpha)
        loras.append(LoraSpec(name="nextgpt", path="lora/nextgpt", rank=ckpt.lora_rank))
    model.config.vocab_size = vocab
    model.save_pretrained(str(root / "llm"), safe_serialization=True)
    tokenizer.save_pretrained(str(root / "llm"))
    return _LLMResult(hidden, vocab, int(getattr(model.config, "max_position_embeddings", 2048)), ids,
                      int(tokenizer.bos_token_id), loras)


def _check_added_tokens(path: Path, ids: dict[str, int]) -> None:
    if not path.is_file():
        return
    released = json.loads(path.read_text())
    wrong = {t: (i, ids.get(t)) for t, i in released.items() if t in ids and ids[t] != i}
    if wrong:
        raise _fail(f"{path}: token ids differ from the tokenizer's: {wrong}", "token_mismatch")


def _merge_lora(model: torch.nn.Module, ckpt: ReleaseCheckpoint, scale: float) -> None:
    layers = model.model.layers  # type: ignore[union-attr]
    with torch.no_grad():
        for (layer, proj), (a, b) in ckpt.lora.items():
            linear = getattr(layers[layer].self_attn, proj)
            delta = (b.float() @ a.float()) * scale
            if delta.shape != linear.weight.shape:
                raise _fail(f"LoRA layer {layer} {proj}: delta {list(delta.shape)} vs weight {list(linear.weight.shape)}")
            linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))


def _write_adapter(out: Path, ckpt: ReleaseCheckpoint, alpha: float) -> None:
    from peft import LoraConfig

    LoraConfig(r=ckpt.lora_rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
               task_type="CAUSAL_LM", inference_mode=True).save_pretrained(str(out))
    weights: dict[str, torch.Tensor] = {}
    for (layer, proj), (a, b) in ckpt.lora.items():
        base = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
        weights[f"{base}.lora_A.weight"] = a
        weights[f"{base}.lora_B.weight"] = b
    save_state_dict(weights, out / "adapter_model.safetensors")


def _write_encoder(root: Path, opts: ConvertOptions, ckpt: ReleaseCheckpoint) -> None:
    state = load_imagebind_state_dict(opts.imagebind)
    expected = {k: tuple(v.shape) for k, v in imagebind_without_weights(opts.imagebind_config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unused = sorted(set(state) - set(expected))
    wrong = [f"{k}: {list(state[k].shape)} != {list(s)}" for k, s in expected.items()
             if k in state and tuple(state[k].shape) != s]
    if missing or unused or wrong:
        raise _fail(
            f"{opts.imagebind}: does not match ImageBind {opts.imagebind_config.model_dump()}: "
            f"missing {missing[:5]} ({len(missing)}), unused {unused[:5]} ({len(unused)}), "
            f"wrong shapes {wrong[:5]} ({len(wrong)})",
            "imagebind_mismatch",
        )
    save_state_dict(state, root / "encoder" / "imagebind.safetensors")
    save_state_dict({"weight": ckpt.llama_proj_weight, "bias": ckpt.llama_proj_bias},
                    root / "encoder" / "input_projection.safetensors")


def _projector_spec(modality: str, weights: dict[str, torch.Tensor], heads: int) -> ProjectorSpec:
    def layers(part: str) -> int:
        return len({m.group(1) for k in weights if (m := re.match(rf"tfm\.{part}\.layers\.(\d+)\.", k))})

    try:
        hidden, in_dim = weights["fc.weight"].shape
        return ProjectorSpec(
            weights=f"projectors/{modality}.safetensors",
            signal_embeddings=f"projectors/{modality}.signal_embeddings.safetensors",
            in_dim=in_dim, hidden_dim=hidden, num_heads=heads,
            num_encoder_layers=layers("encoder"), num_decoder_layers=layers("decoder"),
            ffn_dim=weights["tfm.encoder.layers.0.linear1.weight"].shape[0],
            num_queries=weights["query_embs"].shape[1], out_dim=weights["model.weight"].shape[0],
        )
    except (KeyError, ValueError) as exc:
        raise _fail(f"{modality} projector: cannot read its shape ({exc})", "checkpoint_invalid") from exc


def _write_outputs(root: Path, opts: ConvertOptions, ckpt: ReleaseCheckpoint,
                   llm: _LLMResult) -> dict[Modality, OutputSpec]:
    outputs: dict[Modality, OutputSpec] = {}
    for modality in OUTPUT_MODALITIES:
        weights = ckpt.projectors[modality]
        spec = _projector_spec(modality, weights, opts.projector_heads)
        projector = OutputProjector(spec)
        result = projector.load_state_dict(weights, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise _fail(
                f"{modality} projector: missing {result.missing_keys}, unused {result.unexpected_keys}",
                "checkpoint_invalid",
            )
        tokens = signal_tokens(modality)
        ids = [llm.ids[t] for t in tokens]
        save_state_dict(weights, root / spec.weights)
        save_state_dict({"signal_input_embeddings": ckpt.embed_tokens[ids]}, root / spec.signal_embeddings)
        outputs[modality] = OutputSpec(
            signal=SignalSpec(tokens=tokens, token_ids=ids),
            projector=spec,
            decoder=DecoderSpec(pipeline=PIPELINE_FOR_MODALITY[modality],
                                source=_place_decoder(root, modality, opts.decoders.get(modality)),
                                defaults=DECODER_DEFAULTS[modality]),
        )
    return outputs


def _place_decoder(root: Path, modality: str, source: str | None) -> str:
    if source is None:
        return f"hub:{DECODER_HUB_IDS[modality]}"
    local = Path(source)
    if local.is_dir():
        shutil.copytree(local, root / "decoders" / modality)
        return f"decoders/{modality}"
    if local.exists() or source.startswith((".", "/")):
        raise _fail(f"decoder {modality}: {source} is not a pipeline directory")
    return f"hub:{source}"


def _manifest(opts: ConvertOptions, llm: _LLMResult, outputs: dict[Modality, OutputSpec]) -> BundleManifest:
    return BundleManifest(
        schema_version=BUNDLE_SCHEMA_VERSION,
        name=opts.name,
        version=opts.version,
        description=f"Converted from {opts.checkpoint_dir.name} (LoRA {opts.lora}).",
        hidden_state_offset=opts.hidden_state_offset,
        llm=LLMSpec(hidden_size=llm.hidden_size, vocab_size=llm.vocab_size, max_model_len=llm.max_model_len,
                    loras=llm.loras, default_lora=llm.loras[0].name if llm.loras else None),
        encoder=EncoderSpec(config=opts.imagebind_config, weights="encoder/imagebind.safetensors",
                            input_projection="encoder/input_projection.safetensors"),
        prompt=PromptSpec(media_start=MEDIA_START, media_start_id=llm.ids[MEDIA_START], media_end=MEDIA_END,
                          media_end_id=llm.ids[MEDIA_END], bos_id=llm.bos_id),
        stop=StopSpec(strings=[STOP_STRING], token_ids=[llm.ids[STOP_STRING]]),
        generation=GENERATION_DEFAULTS,
        outputs=outputs,
    )
