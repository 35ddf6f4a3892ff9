"""Run by torchrun in the distributed-training test: a regression trained by the project's loop, one global
batch drawn per step and sharded over the processes; the main process's loss log is the curve compared."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from services.world.pretrain.loop import LoopConfig, local_shard, train_part


def main(workdir: Path, global_batch: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    data = torch.randn(512, 6, generator=torch.Generator().manual_seed(1))
    target = torch.sin(data.sum(dim=1, keepdim=True))

    def step_loss(generator: torch.Generator) -> dict[str, torch.Tensor]:
        pick = local_shard(torch.randint(len(data), (global_batch,), generator=generator))
        return {"mse": ((model(data[pick]) - target[pick]) ** 2).mean()}

    train_part("ddp", model, step_loss, LoopConfig(steps=20, lr=0.02, warmup=2, log_every=1, grad_clip=0.0), workdir,
               progress=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
