"""The three stages: what trains, on which conversations, with which losses; each writes a servable bundle."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.bundle.loader import Bundle, load_bundle
from services.bundle.manifest_io import write_manifest
from services.bundle.release import LORA_TARGETS
from services.bundle.staging import staged_output
from services.bundle.tensor_io import save_state_dict
from services.contracts.bundle_manifest import LoraSpec
from services.training.examples import Encoded, Example, encode_example
from services.training.model import LossWeights, NextGPTTrainable
from services.training.world_tasks import Task, decoder_alignment, encoder_alignment, instruction
from services.world.pretrain.loop import LoopConfig, local_shard, train_part

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class StageSpec:
    name: str
    conversations: Task
    loop: LoopConfig
    batch_size: int
    weights: LossWeights = field(default_factory=LossWeights)
    input_projection: bool = False
    projectors: bool = False
    signal_rows: bool = False
    lora: bool = False


@dataclass(frozen=True)
class LoraOptions:
    name: str = "nextgpt"
    rank: int = 32  # the release's r and alpha (scale 1.0)
    alpha: int = 32
    dropout: float = 0.1
    resume: bool = False  # start from the bundle's adapter of this name instead of a fresh one


STAGES = {
    # 4000 steps, not 2000: on the world a clip's direction is the last thing stage 1 learns to put into words (the
    # frozen LLM reads colour, shape and size from the projected tokens within ~1000 steps; the direction only from
    # ~1600). At step 1600 a 4000-step cosine schedule is still at 0.7x its peak learning rate, a 2000-step one at
    # 0.19x: there the direction stayed at chance (27% of fresh clips' motion words right, against 98% with 4000).
    "align-encoder": StageSpec("align-encoder", encoder_alignment, LoopConfig(steps=4000, lr=1e-3, warmup=30), 32,
                               input_projection=True),
    "align-decoder": StageSpec("align-decoder", decoder_alignment, LoopConfig(steps=1000, lr=1e-3, warmup=30), 32,
                               projectors=True, signal_rows=True),
    "instruct": StageSpec("instruct", instruction, LoopConfig(steps=3000, lr=1e-3, warmup=50), 32,
                          weights=LossWeights(l2=(("image", 1.0), ("video", 2.0), ("audio", 1.0))),
                          input_projection=True, projectors=True, signal_rows=True, lora=True),
}


def prepare(model: NextGPTTrainable, spec: StageSpec, lora: LoraOptions) -> None:
    if spec.lora:
        model.add_lora(lora.rank, lora.alpha, lora.dropout, LORA_TARGETS, lora.name, lora.resume)
    if spec.input_projection:
        model.train_input_projection()
    if spec.projectors:
        model.train_projectors()
    if spec.signal_rows:
        model.train_signal_rows()


def encoded_pool(model: NextGPTTrainable, examples: list[Example]) -> list[Encoded]:
    return [encode_example(model.manifest, model.encode_text, e) for e in examples]


def run_stage(spec: StageSpec, bundle: Bundle, pool: list[Encoded], media_table: torch.Tensor, workdir: Path,
              lora: LoraOptions = LoraOptions(), progress: bool = True,
              model: NextGPTTrainable | None = None) -> NextGPTTrainable:
    """``model``: one already prepared for ``spec`` (its held-out losses taken with the adapter it trains)."""
    if model is None:
        model = NextGPTTrainable(bundle)
        prepare(model, spec, lora)
    groups: dict[str, int] = {}
    for name, count in model.trainable_summary():
        key = ".".join(p for p in name.split(".") if not p.isdigit())
        key = "lora" if "lora_" in key else ".".join(key.split(".")[:2])
        groups[key] = groups.get(key, 0) + count
    for key, count in groups.items():
        log.info("%s trains %s: %d parameters", spec.name, key, count)

    def step_loss(generator: torch.Generator) -> dict[str, torch.Tensor]:
        pick = local_shard(torch.randint(len(pool), (spec.batch_size,), generator=generator)).tolist()
        return model.losses([pool[i] for i in pick], media_table, spec.weights)

    train_part(spec.name, model, step_loss, spec.loop, workdir, progress=progress)
    return model


def export_bundle(model: NextGPTTrainable, spec: StageSpec, out: Path, lora: LoraOptions = LoraOptions(),
                  force: bool = False) -> Bundle:
    """The input bundle with the trained parts replaced: a bundle that serves with no conversion."""
    source = model.bundle
    manifest = model.manifest  # the bundle's, with the input projection's design if stage 1 chose another
    with staged_output(out, force=force) as root:
        shutil.copytree(source.root, root, dirs_exist_ok=True)
        save_state_dict(model.input_projection, root / manifest.encoder.input_projection)
        for modality, out_spec in manifest.outputs.items():
            save_state_dict(model.projectors[modality], root / out_spec.projector.weights)
            rows = model.signal_rows(modality).detach().clone()
            save_state_dict({"signal_input_embeddings": rows}, root / out_spec.projector.signal_embeddings)
        if spec.signal_rows:
            _write_signal_rows(model, root / manifest.llm.path)
        if spec.lora:
            path = f"lora/{lora.name}"
            shutil.rmtree(root / path, ignore_errors=True)
            model.llm.save_pretrained(str(root / "lora"), selected_adapters=[lora.name])
            # PEFT writes a named adapter into <dir>/<name>.
            loras = [entry for entry in manifest.llm.loras if entry.name != lora.name]
            loras.append(LoraSpec(name=lora.name, path=path, rank=lora.rank))
            llm = manifest.llm.model_copy(update={"loras": loras, "default_lora": lora.name})
            manifest = manifest.model_copy(update={"llm": llm})
        manifest = manifest.model_copy(update={"version": f"{manifest.version}+{spec.name}"})
        write_manifest(root, manifest)
    return load_bundle(out)


def _write_signal_rows(model: NextGPTTrainable, llm_dir: Path) -> None:
    """Only embed_tokens and lm_head changed (their signal rows): rewrite those two tensors in the weight file,
    leaving the rest byte-identical (saving the PEFT-wrapped model would mix LoRA layers into the base)."""
    from safetensors.torch import load_file, save_file

    path = llm_dir / "model.safetensors"
    state = load_file(str(path))
    base = model.base_llm()
    state["model.embed_tokens.weight"] = base.get_input_embeddings().weight.detach().clone().contiguous()
    state["lm_head.weight"] = base.get_output_embeddings().weight.detach().clone().contiguous()
    save_file(state, str(path), metadata={"format": "pt"})
