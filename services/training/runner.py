"""``nextgpt train <stage>``: a bundle and a world folder in, a trained bundle out, with a held-out check."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import PartialState

from services.bundle.loader import load_bundle
from services.bundle.staging import check_replaceable
from services.contracts.bundle_manifest import InputProjectionSpec
from services.training.examples import Encoded
from services.training.model import NextGPTTrainable
from services.training.release_data import BundleEncoders, DataFormatError, release_examples
from services.training.sizes import HELD_OUT, POOL
from services.training.stages import STAGES, LoraOptions, encoded_pool, export_bundle, prepare, run_stage
from services.training.world_source import WorldExamples, decoder_targets, embed_world
from services.world.dataset import generate_split, read_world
from services.world.evaluate import EVAL_SEED

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRun:
    stage: str
    bundle: Path
    data: Path
    out: Path
    work: Path
    steps: int | None = None
    seed: int = 0
    lora: LoraOptions = LoraOptions()
    force: bool = False
    progress: bool = True
    pool_size: int = POOL
    held_out: int = HELD_OUT  # 0: no held-out check
    media_root: Path | None = None  # release-format data: the folder its media file names are under
    # Stage 1 only: train a fresh input projection of this design instead of the bundle's.
    input_projection: InputProjectionSpec | None = None
    deepspeed: Path | None = None  # a DeepSpeed config (ZeRO over the processes of `accelerate launch`)


@torch.inference_mode()
def held_out_losses(model: NextGPTTrainable, pool: list[Encoded], table: torch.Tensor, spec_weights: object,
                    batch: int = 32) -> dict[str, float]:
    model.eval()
    totals: dict[str, float] = {}
    for i in range(0, len(pool), batch):
        for name, value in model.losses(pool[i:i + batch], table, spec_weights).items():  # type: ignore[arg-type]
            totals[name] = totals.get(name, 0.0) + float(value) * len(pool[i:i + batch])
    return {k: round(v / len(pool), 5) for k, v in totals.items()}


def _check_data(run: StageRun) -> bool:
    """Whether ``run.data`` is a world folder (else a release-format file, which needs ``media_root``); what is
    neither is refused before the bundle loads."""
    if (run.data / "world.json").is_file():
        return True
    if run.data.is_dir():
        raise DataFormatError(f"{run.data}: not a world folder (no world.json: make one with `nextgpt world data`), "
                              f"nor a release-format JSON file")
    if not run.data.is_file():
        raise DataFormatError(f"{run.data} does not exist")
    if run.media_root is None:
        raise DataFormatError("release-format data needs --media-root (the folder its file names are under)")
    return False


def train_stage(run: StageRun) -> dict[str, object]:
    spec = STAGES[run.stage]
    world = _check_data(run)
    check_replaceable(run.out, force=run.force)  # before the run, not at its export
    if run.steps:
        spec = replace(spec, loop=replace(spec.loop, steps=run.steps))
    spec = replace(spec, loop=replace(spec.loop, seed=run.seed, deepspeed=run.deepspeed))
    bundle = load_bundle(run.bundle)
    if run.input_projection is not None and not spec.input_projection:
        raise ValueError(f"{run.stage} does not train the input projection: choose its design in align-encoder")
    model = NextGPTTrainable(bundle, run.input_projection)
    token_level = model.manifest.encoder.projection.kind == "group"
    if world:
        splits = read_world(run.data)
        fresh = {m: generate_split(m, EVAL_SEED, len(s) // 4 or 1) for m, s in splits.items()}
        targets = decoder_targets(bundle)
        cache = run.data / ".cache"
        train_source = WorldExamples(splits, embed_world(bundle, splits, cache=cache, token_level=token_level), targets)
        eval_source = WorldExamples(fresh, embed_world(bundle, fresh, cache=cache, token_level=token_level), targets)
        pool = encoded_pool(model, train_source.examples(spec.conversations, run.pool_size, run.seed))
        held_out = encoded_pool(model, eval_source.examples(spec.conversations, run.held_out, EVAL_SEED,
                                                            split="eval")) if run.held_out else []
        train_table, eval_table = train_source.table, eval_source.table
    else:
        assert run.media_root is not None
        encoders = BundleEncoders(bundle, token_level)
        pool = encoded_pool(model, release_examples(run.data, run.media_root, run.stage, encoders, run.pool_size,
                                                    run.seed))
        held_out = encoded_pool(model, release_examples(run.data, run.media_root, run.stage, encoders, run.held_out,
                                                        EVAL_SEED, split="eval")) if run.held_out else []
        train_table = eval_table = encoders.table
        if not pool:
            raise DataFormatError(f"{run.data}: no training examples")
    prepare(model, spec, run.lora)  # before the "before": a resumed adapter counts in it
    before = held_out_losses(model, held_out, eval_table, spec.weights) if held_out else {}
    log.info("%s: held-out losses before %s", run.stage, before)
    run_stage(spec, bundle, pool, train_table, run.work, run.lora, run.progress, model=model)
    after = held_out_losses(model, held_out, eval_table, spec.weights) if held_out else {}
    state = PartialState()
    if state.is_main_process:  # several processes (accelerate launch) train one model; one writes it
        export_bundle(model, spec, run.out, run.lora, force=run.force)
    state.wait_for_everyone()
    report = {"stage": run.stage, "steps": spec.loop.steps, "held_out_before": before, "held_out_after": after,
              "trainable": sum(n for _, n in model.trainable_summary()), "bundle": str(run.out)}
    if state.is_main_process:
        (run.work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
