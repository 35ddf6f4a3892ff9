"""Training in several processes (accelerate over torch.distributed with gloo, as `accelerate launch` runs it on
CPUs): two processes with half the global batch each follow the same loss curve as one process, with the
optimizer state whole in each process or sharded by DeepSpeed ZeRO-2 (the release's choice); a sharded run
killed between checkpoints resumes onto the same curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.deepspeed import DEEPSPEED_PYTHON, ZERO2, needs_deepspeed
from tests.support.servers import free_port

REPO = Path(__file__).parents[2]


def _curve(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "loss.jsonl").read_text().splitlines()]


def _run(processes: int, workdir: Path, deepspeed: Path | None = None, stop_after: int = 0) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    python = DEEPSPEED_PYTHON if deepspeed else sys.executable
    cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
           f"--master_port={free_port()}", "-m", "tests.support.ddp_regression", str(workdir), "32",
           str(deepspeed or ""), str(stop_after)]
    subprocess.run(cmd, check=True, env=env, timeout=240, cwd=REPO)


@pytest.fixture(scope="module")
def one_process_curve(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    workdir = tmp_path_factory.mktemp("one")
    _run(1, workdir)
    return _curve(workdir)


def test_two_processes_give_the_one_process_loss_curve(tmp_path: Path, one_process_curve: list[float]) -> None:
    _run(2, tmp_path / "two")
    one, two = one_process_curve, _curve(tmp_path / "two")
    assert len(one) == len(two) == 20
    assert one[-1] < one[0] * 0.8  # it learns
    assert two == pytest.approx(one, rel=1e-4, abs=1e-6)


@needs_deepspeed
def test_zero2_over_two_processes_gives_the_one_process_curve_and_resumes(tmp_path: Path,
                                                                         one_process_curve: list[float]) -> None:
    # Sharded, killed after 12 steps (last checkpoint: 10) and started again: it follows one process's curve, and
    # goes on from step 10 onto it.
    _run(2, tmp_path / "zero2", ZERO2, stop_after=12)
    _run(2, tmp_path / "zero2", ZERO2)
    one, sharded = one_process_curve, _curve(tmp_path / "zero2")
    assert len(sharded) == 12 + 10
    assert sharded[:12] == pytest.approx(one[:12], rel=1e-4, abs=1e-6)
    assert sharded[12:] == pytest.approx(one[10:], rel=1e-4, abs=1e-6)
    shards = list((tmp_path / "zero2" / "deepspeed").glob("step20/*optim_states.pt"))
    assert len(shards) == 2  # each process wrote its own part of the optimizer state
