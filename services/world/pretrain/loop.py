"""One training loop for every part: accelerate, resumable checkpoints, a progress bar, a loss log (JSON lines and
TensorBoard events).

A part gives its trainable module, and a function that computes the loss of one step from a batch generator.
Batches are drawn from a generator seeded with (seed, step), so a run resumed from a checkpoint sees the same
batches as one that never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from torch import nn
from tqdm import tqdm

from services.world.pretrain import zero

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
LOSS_LOG = "loss.jsonl"
TENSORBOARD = "tensorboard"


@dataclass(frozen=True)
class LoopConfig:
    steps: int
    lr: float
    warmup: int = 50
    weight_decay: float = 0.0
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0
    grad_clip: float = 1.0
    # A DeepSpeed config (deploy/training/zero2.json): ZeRO shards the optimizer state and gradients over the
    # processes. None: every process holds them whole and gradients are averaged here.
    deepspeed: Path | None = None


StepLoss = Callable[[torch.Generator], "dict[str, torch.Tensor]"]


def end_processes() -> None:
    """Destroy the process group a distributed run set up, once the run is over. A process that exits with the
    group alive leaves gloo's threads to the interpreter's teardown, which now and then aborts there ("terminate
    called without an active exception", SIGABRT), and torchrun then reports a finished run as failed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device() -> torch.device:
    """Where this process trains (a GPU under `accelerate launch` when there is one, else the CPU)."""
    return PartialState().device


def local_shard(indices: torch.Tensor) -> torch.Tensor:
    """This process's share of a global batch: every process draws the same indices from the step's generator
    and keeps every n-th, so n processes together see exactly the global batch one process would."""
    state = PartialState()
    return indices[state.process_index::state.num_processes]


def _schedule(cfg: LoopConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def train_part(name: str, module: nn.Module, step_loss: StepLoss, cfg: LoopConfig, workdir: Path,
               progress: bool = True) -> list[dict[str, float]]:
    """Train ``module``'s parameters that require grad for ``cfg.steps`` steps; resumes from ``workdir``.

    ``step_loss(generator)`` returns named losses; their sum is minimised. Returns the loss log of this run.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    # TensorBoard event files under <workdir>/tensorboard/<name> (`tensorboard --logdir <workdir>/tensorboard`),
    # beside the JSON loss log; only the main process writes them.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with="tensorboard",
                              project_dir=str(workdir / TENSORBOARD))
    accelerator.init_trackers(name)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    start = 0
    checkpoint = workdir / CHECKPOINT
    module.to(accelerator.device)
    engine = None
    if cfg.deepspeed is not None:
        engine = zero.start_engine(module, optimizer, scheduler, cfg.deepspeed, cfg.grad_clip)
        start = zero.load_checkpoint(engine, workdir)
    elif checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])
    if start:
        log.info("%s: resumed at step %d of %d", name, start, cfg.steps)
    # Parts compute their losses through their own references to the module, so it is not wrapped in DDP (whose
    # gradient hooks only fire through the wrapper's forward): without DeepSpeed, gradients are averaged over
    # processes explicitly.
    module.train()
    history: list[dict[str, float]] = []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=name, unit="step",
               disable=not (progress and accelerator.is_main_process))
    started = time.perf_counter()
    with (workdir / LOSS_LOG).open("a") as loss_log:
        for step in bar:
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            losses = step_loss(generator)
            total = sum(losses.values())
            if engine is not None:
                # Reduce-scattered into each process's shard.
                engine.backward(zero.same_graph_on_every_process(total, params))
                engine.step()  # clips, steps the optimizer and the schedule, zeroes the gradients
            else:
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(total)
                if accelerator.num_processes > 1:
                    for param in params:
                        if param.grad is None:
                            param.grad = torch.zeros_like(param)
                        param.grad = accelerator.reduce(param.grad, reduction="mean")
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
            # Logged: the mean over processes (with equal shards, the global batch's loss).
            logged = _mean_over_processes(accelerator, {"loss": total, **losses})
            row = {"step": step + 1, **logged, "lr": scheduler.get_last_lr()[0],
                   "elapsed_s": round(time.perf_counter() - started, 2)}
            history.append(row)
            if accelerator.is_main_process and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                loss_log.write(json.dumps(row) + "\n")
                loss_log.flush()
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                if engine is not None:
                    zero.save_checkpoint(engine, workdir, step + 1)
                else:
                    _save(accelerator, module, optimizer, scheduler, step + 1, checkpoint)
    # Trackers only: `end_training` would also destroy the process group, which the caller still needs (the next
    # part, the main process writing the bundle while the others wait).
    for tracker in accelerator.trackers:
        tracker.finish()
    module.eval()
    return history


def _mean_over_processes(accelerator: Accelerator, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each named loss averaged over the processes (with equal shards, the global batch's). A shard can lack a
    loss (no audio in it, no ``l2_audio``), and every process must make the same collectives: the names are
    agreed first, a missing one counts 0, and all go in one reduction."""
    if accelerator.num_processes == 1:
        return {k: float(v.detach()) for k, v in values.items()}
    names = sorted({name for found in gather_object([sorted(values)]) for name in found})
    missing = torch.zeros((), device=accelerator.device)
    stacked = torch.stack([values.get(n, missing).detach().float().reshape(()) for n in names])
    return dict(zip(names, accelerator.reduce(stacked, reduction="mean").tolist()))


def _save(accelerator: Accelerator, module: nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, path: Path) -> None:
    if not accelerator.is_main_process:
        return
    tmp = path.with_suffix(".tmp")
    torch.save({"module": module.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step}, tmp)
    tmp.replace(path)  # a kill mid-write leaves the previous checkpoint whole
