"""Real ``nextgpt worker`` (Celery) processes for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.servers import wait_until

NEXTGPT = str(Path(sys.executable).parent / "nextgpt")


class WorkerProcess:
    def __init__(self, queues: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.out = log.open("ab")
        self.proc = subprocess.Popen([NEXTGPT, "worker", "--queues", queues, "--hostname", f"w{os.getpid()}-{log.stem}@%h"],
                                     stdout=self.out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> WorkerProcess:
        wait_until(lambda: b" ready." in self.log.read_bytes(), timeout, "celery worker", self.proc, self.log)
        return self

    def kill(self) -> None:
        """SIGKILL, as when a node dies: no chance to ack, requeue or clean up."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.out.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.out.close()
