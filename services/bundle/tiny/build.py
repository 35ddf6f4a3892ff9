"""Assemble the tiny bundle: every part of the real layout, random weights, deterministic for a seed."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from services.bundle.manifest_io import write_manifest
from services.bundle.staging import staged_output
from services.bundle.tiny.decoders import build_audio_pipeline, build_image_pipeline, build_video_pipeline
from services.bundle.tiny.encoder import build_encoder
from services.bundle.tiny.llm import LORA_RANK, build_llm, build_lora
from services.bundle.tiny.projectors import TINY_OUT_DIMS, build_projector, projector_spec
from services.bundle.release import MEDIA_END, MEDIA_START, STOP_STRING, signal_tokens
from services.bundle.tiny.text_tokenizers import build_llm_tokenizer
from services.contracts.bundle_manifest import (
    OUTPUT_MODALITIES,
    BUNDLE_SCHEMA_VERSION,
    BundleManifest,
    DecoderDefaults,
    DecoderSpec,
    EncoderSpec,
    GenerationDefaults,
    LLMSpec,
    LoraSpec,
    Modality,
    OutputSpec,
    PIPELINE_FOR_MODALITY,
    PromptSpec,
    SignalSpec,
    StopSpec,
)

TINY_DECODER_DEFAULTS = {
    "image": DecoderDefaults(steps=4, guidance_scale=7.5, height=64, width=64),
    "video": DecoderDefaults(steps=4, guidance_scale=7.5, height=64, width=64, frames=8, fps=8),
    "audio": DecoderDefaults(steps=4, guidance_scale=7.5, seconds=1.0, sample_rate=16000),
}
_PIPELINE_BUILDERS = {"image": build_image_pipeline, "video": build_video_pipeline, "audio": build_audio_pipeline}


def build_tiny_bundle(out: Path, seed: int = 0, *, force: bool = False) -> BundleManifest:
    with staged_output(out, force=force) as staging:
        return _build_into(staging, seed)


def _build_into(root: Path, seed: int) -> BundleManifest:
    torch.use_deterministic_algorithms(True, warn_only=True)
    tokenizer = build_llm_tokenizer(root / "llm", seed)
    llm = build_llm(root / "llm", tokenizer, seed)
    hidden = llm.config.hidden_size
    build_lora(root / "lora" / "nextgpt", llm, seed)
    imagebind = build_encoder(root / "encoder", hidden, seed)

    embeddings = llm.get_input_embeddings().weight.detach()
    outputs: dict[Modality, OutputSpec] = {}
    work = root / ".work"
    for index, modality in enumerate(OUTPUT_MODALITIES):
        tokens = signal_tokens(modality)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        spec = projector_spec(modality, hidden)
        build_projector(root, spec, embeddings[ids].clone(), seed + 10 + index)
        _PIPELINE_BUILDERS[modality](root / "decoders" / modality, work, TINY_OUT_DIMS[modality], seed + 20 + index)
        outputs[modality] = OutputSpec(
            signal=SignalSpec(tokens=tokens, token_ids=ids),
            projector=spec,
            decoder=DecoderSpec(
                pipeline=PIPELINE_FOR_MODALITY[modality],
                source=f"decoders/{modality}",
                defaults=TINY_DECODER_DEFAULTS[modality],
            ),
        )
    shutil.rmtree(work)

    manifest = BundleManifest(
        schema_version=BUNDLE_SCHEMA_VERSION,
        name="nextgpt-tiny",
        version=f"tiny-seed{seed}",
        description="Real NExT-GPT architectures at tiny width with random weights, for tests and CPU runs.",
        hidden_state_offset=-1,
        llm=LLMSpec(
            hidden_size=hidden, vocab_size=len(tokenizer), max_model_len=2048,
            loras=[LoraSpec(name="nextgpt", path="lora/nextgpt", rank=LORA_RANK)], default_lora="nextgpt",
        ),
        encoder=EncoderSpec(
            config=imagebind, weights="encoder/imagebind.safetensors",
            input_projection="encoder/input_projection.safetensors",
        ),
        prompt=PromptSpec(
            media_start=MEDIA_START, media_start_id=tokenizer.convert_tokens_to_ids(MEDIA_START),
            media_end=MEDIA_END, media_end_id=tokenizer.convert_tokens_to_ids(MEDIA_END),
            bos_id=tokenizer.bos_token_id,
        ),
        stop=StopSpec(strings=[STOP_STRING], token_ids=[tokenizer.convert_tokens_to_ids(STOP_STRING)]),
        generation=GenerationDefaults(max_new_tokens=64),
        outputs=outputs,
    )
    write_manifest(root, manifest)
    return manifest
