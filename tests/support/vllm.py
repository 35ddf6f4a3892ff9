"""A real vLLM OpenAI server and the hidden-state pooler, started from the vLLM environment (.venv-vllm)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.bundle.loader import Bundle
from services.llm.vllm_launch import VLLM_ENV, pooler_args, server_args
from tests.support.servers import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


@dataclass
class VLLMInfo:
    server_url: str
    pooler_url: str
    pids: tuple[int, int]


@contextlib.contextmanager
def vllm_processes(python: str, bundle: Bundle) -> Iterator[VLLMInfo]:
    work = Path(tempfile.mkdtemp(prefix="nextgpt-vllm-"))
    # vLLM leaves IPC socket files in TMPDIR: a private one is removed with everything else.
    env = {**os.environ, **VLLM_ENV, "TMPDIR": str(work), "VLLM_CACHE_ROOT": str(work / "cache"),
           "PYTHONPATH": str(REPO)}
    server_port, pooler_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    logs = {"server": work / "server.log", "pooler": work / "pooler.log"}
    try:
        server = server_args(python, bundle, server_port, max_num_seqs=8)
        for name, args in (("server", server),
                           ("pooler", pooler_args(python, bundle, pooler_port))):
            with logs[name].open("wb") as out:
                # A process group of its own (killed as one below) but not a session of its own: with the kernel's
                # autogroup scheduling a new session is a CPU group of its own, and on this 2-core machine a vLLM
                # server in one admitted one request at a time (8 concurrent streams: 1 running, TTFT p50 ~1 s vs
                # 40 ms for the same server in the caller's session, which batches all 8).
                procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work,
                                              process_group=0))
        info = VLLMInfo(f"http://127.0.0.1:{server_port}", f"http://127.0.0.1:{pooler_port}",
                        (procs[0].pid, procs[1].pid))
        wait_until(lambda: httpx.get(f"{info.server_url}/health").status_code == 200, 400, "vLLM server",
                   procs[0], logs["server"])
        wait_until(lambda: httpx.get(f"{info.pooler_url}/health").status_code == 200, 400, "vLLM pooler",
                   procs[1], logs["pooler"])
        yield info
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        shutil.rmtree(work, ignore_errors=True)
