"""DeepSpeed ZeRO for the training loop: the optimizer state and gradients of the trainable parts sharded over the
processes (ZeRO-2 with ``deploy/training/zero2.json``, as the release trains), on GPUs or CPUs (gloo).

The processes are set up by accelerate (``accelerate launch`` / torchrun); DeepSpeed's engine is started on that
process group directly, because accelerate's own DeepSpeed integration only runs on accelerators (on a CPU it
reports a single process while DeepSpeed's group has them all). The loop keeps drawing and sharding each global
batch itself and computes losses through its own references to the module (ZeRO-2 reduces gradients from
parameter hooks, not from the engine's forward).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from torch import nn

CHECKPOINTS = "deepspeed"


def engine_config(path: Path, grad_clip: float) -> dict[str, Any]:
    """The file's ZeRO and precision settings; batch sizes and clipping from the loop. DeepSpeed checks
    ``train_batch_size == micro batch x accumulation x processes``: the loop feeds one sharded global batch per
    step, so it counts one micro batch per process and the step's real size is the loop's business."""
    config = json.loads(path.read_text())
    for key in ("fp16", "bf16"):
        if config.get(key, {}).get("enabled"):
            # The loop calls the module itself with float32 inputs; DeepSpeed's half-precision engine casts the
            # module's weights, which those calls would not match.
            raise ValueError(f"{path}: {key} is not supported by this loop (float32 master weights only)")
    config.update(train_batch_size=PartialState().num_processes, train_micro_batch_size_per_gpu=1,
                  gradient_accumulation_steps=1, gradient_clipping=grad_clip)
    return config


def start_engine(module: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, config_path: Path, grad_clip: float) -> Any:
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=engine_config(config_path, grad_clip))
    return engine


def same_graph_on_every_process(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """A stand-in for ``loss`` with the same gradients, whose graph is the same on every process.

    ZeRO-2 packs gradients into its reduction buckets in the order backward produces them, and expects every
    process to produce the same ones in the same order (as DDP does). A batch shard without audio leaves the
    audio projector out of that process's graph: the buckets no longer line up (gloo: "Received data size
    doesn't match expected size"; with equal sizes the sums would silently mix parameters). So the gradients
    are taken first, and DeepSpeed's backward runs over sum(p * g), built in parameter order (zeros for a
    parameter this shard did not use)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    terms = [(p * (g if g is not None else torch.zeros_like(p)).detach()).sum() for p, g in zip(params, grads)]
    return torch.stack(terms).sum()


def load_checkpoint(engine: Any, workdir: Path) -> int:
    """The step the sharded checkpoint was taken at (every process loads its own shard), or 0 when none."""
    folder = workdir / CHECKPOINTS
    if not (folder / "latest").is_file():
        return 0
    _, client = engine.load_checkpoint(str(folder))
    return int((client or {}).get("step", 0))


def save_checkpoint(engine: Any, workdir: Path, step: int) -> None:
    """Every process writes its shard under a new tag; DeepSpeed then points ``latest`` at it (a kill mid-write
    leaves the previous one whole), and the main process removes the older tags."""
    folder = workdir / CHECKPOINTS
    tag = f"step{step}"
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step})
    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        for old in folder.glob("step*"):
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
