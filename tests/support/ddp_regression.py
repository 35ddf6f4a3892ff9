"""Run by torchrun in the distributed-training test: a regression trained by the project's loop, one global
batch drawn per step and sharded over the processes; the main process's loss log is the curve compared."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from services.world.pretrain.loop import LoopConfig, end_processes, local_shard, train_part


def main(workdir: Path, global_batch: int, deepspeed: Path | None = None, stop_after: int = 0) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    data = torch.randn(512, 6, generator=torch.Generator().manual_seed(1))
    target = torch.sin(data.sum(dim=1, keepdim=True))

    calls = 0

    def step_loss(generator: torch.Generator) -> dict[str, torch.Tensor]:
        nonlocal calls
        calls += 1
        if stop_after and calls > stop_after:
            os._exit(0)  # as a kill would: no checkpoint, no clean-up
        pick = local_shard(torch.randint(len(data), (global_batch,), generator=generator))
        return {"mse": ((model(data[pick]) - target[pick]) ** 2).mean()}

    # Clipping on, so that DeepSpeed's clipping (its config's) is compared with the loop's own.
    cfg = LoopConfig(steps=20, lr=0.02, warmup=2, log_every=1, grad_clip=0.5, checkpoint_every=5,
                     deepspeed=deepspeed)
    train_part("ddp", model, step_loss, cfg, workdir, progress=False)
    end_processes()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else None,
         int(sys.argv[4]) if len(sys.argv) > 4 else 0)
