"""Training in several processes (accelerate over torch.distributed with gloo, as `accelerate launch` runs it on
CPUs): two processes with half the global batch each follow the same loss curve as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import free_port


def _curve(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "loss.jsonl").read_text().splitlines()]


def _run(processes: int, workdir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
           f"--master_port={free_port()}", "-m", "tests.support.ddp_regression", str(workdir), "32"]
    subprocess.run(cmd, check=True, env=env, timeout=240, cwd=Path(__file__).parents[2])


def test_two_processes_give_the_one_process_loss_curve(tmp_path: Path) -> None:
    _run(1, tmp_path / "one")
    _run(2, tmp_path / "two")
    one, two = _curve(tmp_path / "one"), _curve(tmp_path / "two")
    assert len(one) == len(two) == 20
    assert one[-1] < one[0] * 0.8  # it learns
    assert two == pytest.approx(one, rel=1e-4, abs=1e-6)
