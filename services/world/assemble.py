"""Put the pretrained stand-ins together as a bundle in the usual layout: the base NExT-GPT's stages start from.

Frozen parts come from the pretraining work folder; what NExT-GPT learns itself (input projection, output
projectors) starts random here, and the signal tokens' rows are the LM's own (untrained) rows. The bundle loads
and serves like any other; its media are noise until the stages have trained the projections.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file
from transformers import AutoTokenizer

from services.bundle.manifest_io import write_manifest
from services.bundle.release import MEDIA_END, MEDIA_START, STOP_STRING, signal_tokens
from services.bundle.staging import staged_output
from services.bundle.tensor_io import save_state_dict
from services.bundle.tiny.projectors import build_projector, projector_spec
from services.modeling.imagebind import served_state
from services.contracts.bundle_manifest import (
    BUNDLE_SCHEMA_VERSION, OUTPUT_MODALITIES, PIPELINE_FOR_MODALITY, BundleManifest, DecoderDefaults, DecoderSpec,
    EncoderSpec, GenerationDefaults, LLMSpec, Modality, OutputSpec, PromptSpec, SignalSpec, StopSpec,
)
from services.world.attributes import AUDIO_RATE, AUDIO_SECONDS, IMAGE_SIZE, VIDEO_FPS, VIDEO_FRAMES
from services.world.pretrain.decoders import WORLD_COND_DIMS
from services.world.pretrain.imagebind import WORLD_IMAGEBIND
from services.world.pretrained import check_pretrained

WORLD_DECODER_DEFAULTS = {
    "image": DecoderDefaults(steps=25, guidance_scale=7.5, height=IMAGE_SIZE, width=IMAGE_SIZE),
    "video": DecoderDefaults(steps=25, guidance_scale=7.5, height=IMAGE_SIZE, width=IMAGE_SIZE,
                             frames=VIDEO_FRAMES, fps=VIDEO_FPS),
    "audio": DecoderDefaults(steps=25, guidance_scale=7.5, seconds=AUDIO_SECONDS, sample_rate=AUDIO_RATE),
}


def assemble_base_bundle(work: Path, out: Path, seed: int = 0, force: bool = False) -> BundleManifest:
    check_pretrained(work)
    with staged_output(out, force=force) as root:
        return _assemble(work, root, seed)


def _assemble(work: Path, root: Path, seed: int) -> BundleManifest:
    from transformers import LlamaForCausalLM

    shutil.copytree(work / "language" / "exported", root / "llm")
    tokenizer = AutoTokenizer.from_pretrained(str(root / "llm"))
    llm = LlamaForCausalLM.from_pretrained(str(root / "llm"))
    hidden = llm.config.hidden_size
    # The encoder serves the vision and audio branches; ImageBind's text branch (a 49k-row token table), needed
    # only to pretrain and to check retrieval, stays in the work folder.
    full = load_file(str(work / "imagebind" / "imagebind.safetensors"))
    save_state_dict(served_state(full), root / "encoder" / "imagebind.safetensors")
    torch.manual_seed(seed)
    save_state_dict(nn.Linear(WORLD_IMAGEBIND.out_embed_dim, hidden), root / "encoder" / "input_projection.safetensors")
    embeddings = llm.get_input_embeddings().weight.detach()
    outputs: dict[Modality, OutputSpec] = {}
    for index, modality in enumerate(OUTPUT_MODALITIES):
        tokens = signal_tokens(modality)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        spec = projector_spec(modality, hidden, WORLD_COND_DIMS)
        build_projector(root, spec, embeddings[ids].clone(), seed + 10 + index)
        shutil.copytree(work / modality / "exported", root / "decoders" / modality)
        outputs[modality] = OutputSpec(
            signal=SignalSpec(tokens=tokens, token_ids=ids), projector=spec,
            decoder=DecoderSpec(pipeline=PIPELINE_FOR_MODALITY[modality], source=f"decoders/{modality}",
                                defaults=WORLD_DECODER_DEFAULTS[modality]),
        )
    manifest = BundleManifest(
        schema_version=BUNDLE_SCHEMA_VERSION, name="nextgpt-world-base", version=f"pretrained-seed{seed}",
        description="Stand-ins of NExT-GPT's frozen parts pretrained on the synthetic world; projections untrained.",
        # States at the signal positions themselves, as training computes them.
        hidden_state_offset=0,
        # The context the world model is trained toward: pretraining reads 64-token texts, stage 3 conversations of
        # up to ~300 tokens (six exchanges and a request). Served with 2048, a long chat kept every turn and the
        # model, far past any position it learnt, fell apart (drawings at turns 10-29 as asked: 21 of 40 at 2048,
        # 31 of 40 at 512; the gateway leaves the oldest exchanges out to fit).
        llm=LLMSpec(hidden_size=hidden, vocab_size=len(tokenizer), max_model_len=512),
        encoder=EncoderSpec(config=WORLD_IMAGEBIND, weights="encoder/imagebind.safetensors",
                            input_projection="encoder/input_projection.safetensors"),
        prompt=PromptSpec(media_start=MEDIA_START, media_start_id=tokenizer.convert_tokens_to_ids(MEDIA_START),
                          media_end=MEDIA_END, media_end_id=tokenizer.convert_tokens_to_ids(MEDIA_END),
                          bos_id=tokenizer.bos_token_id, bos_per_segment=False),
        stop=StopSpec(strings=[STOP_STRING], token_ids=[tokenizer.convert_tokens_to_ids(STOP_STRING)]),
        generation=GenerationDefaults(max_new_tokens=64, temperature=1.0, top_p=0.01, top_k=50),
        outputs=outputs,
    )
    write_manifest(root, manifest)
    return manifest
