"""``nextgpt`` service processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.servers import wait_until

NEXTGPT = str(Path(sys.executable).parent / "nextgpt")


class ServiceProcess:
    def __init__(self, args: list[str], env: dict[str, str], log: Path, ready_url: str) -> None:
        self.args, self.env, self.log, self.ready_url = args, env, log, ready_url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([NEXTGPT, *self.args], stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env}, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 240) -> ServiceProcess:
        assert self.proc is not None
        wait_until(lambda: httpx.get(self.ready_url, timeout=2).status_code == 200, timeout,
                   " ".join(self.args[:2]), self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
