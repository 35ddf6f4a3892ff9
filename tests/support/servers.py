"""Real servers for tests, on free loopback ports: Redis, an S3-compatible store (SeaweedFS), uvicorn apps.

Each helper starts only what the machine does not already run, and never touches data it did not create.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def free_port() -> int:
    """A loopback port nobody uses now, below the kernel's ephemeral range, and not handed out before. A port from
    that range (what binding port 0 gives) can be taken, between this check and the server's own bind, as the
    source port of any outgoing connection (a client of the test, a service talking to Redis), and the server then
    exits with 'address already in use' (seen in CI: an encoder on 55041)."""
    top = _ephemeral_low()
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(max(1024, top - 12000), top)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {max(1024, top - 12000)}..{top - 1}")


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready:\n{tail}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def _bin(name: str) -> str:
    """A binary from this venv (registry packages ship them there) or from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found in {here.parent} or on PATH")
    return found


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class RedisInfo:
    url: str
    key_prefix: str
    private: bool


async def redis_transactions(client: Any) -> int:
    """EXEC calls the Redis server has answered (an async client): MULTI/EXEC transactions so far."""
    return int((await client.info("commandstats")).get("cmdstat_exec", {}).get("calls", 0))


@contextlib.contextmanager
def redis_server() -> Iterator[RedisInfo]:
    """The machine's Redis on 6379 when it runs (keys under a fresh prefix, removed afterwards), else a private
    ``redis-server`` on a free port without persistence."""
    import redis

    prefix = f"nextgpt-test-{uuid.uuid4().hex[:12]}:"
    if port_open(6379):
        url = f"redis://{LOOPBACK}:6379/0"
        try:
            yield RedisInfo(url=url, key_prefix=prefix, private=False)
        finally:
            client = redis.Redis.from_url(url)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        return
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="nextgpt-redis-"))
    log = workdir / "redis.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [_bin("redis-server"), "--bind", LOOPBACK, "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--protected-mode", "yes"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: redis.Redis(port=port, host=LOOPBACK).ping(), 20, "redis-server", proc, log)
        yield RedisInfo(url=f"redis://{LOOPBACK}:{port}/0", key_prefix=prefix, private=True)
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


class RestartableRedis:
    """A private ``redis-server`` that a fault test may stop and start again on the same port. AOF with fsync on
    every write, as a deployment that must survive a restart would run it (docker-compose.yml does)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="nextgpt-redis-restart-"))
        self.log = self.workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> RestartableRedis:
        import redis

        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [_bin("redis-server"), "--bind", LOOPBACK, "--port", str(self.port), "--save", "",
                 "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir),
                 "--protected-mode", "yes"], stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: redis.Redis(port=self.port, host=LOOPBACK).ping(), 20, "redis-server", self.proc,
                   self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class S3Info:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self, **overrides: Any) -> Any:
        import boto3
        from botocore.config import Config

        params: dict[str, Any] = dict(
            endpoint_url=self.endpoint_url, region_name=self.region, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, config=Config(s3={"addressing_style": "path"}),
        )
        params.update(overrides)
        return boto3.client("s3", **params)


def _distinct_ports(count: int) -> list[int]:
    # SeaweedFS derives gRPC ports as http + 10000; keep both inside the port range and distinct.
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port < 55000 and port not in ports and not port_open(port + 10000):
            ports.append(port)
    return ports


@contextlib.contextmanager
def s3_server() -> Iterator[S3Info]:
    """SeaweedFS ``weed mini`` on loopback, credentials enforced, telemetry off, data in a temporary folder."""
    master, volume, filer, s3, webdav, admin = _distinct_ports(6)
    workdir = Path(tempfile.mkdtemp(prefix="nextgpt-s3-"))
    info = S3Info(endpoint_url=f"http://{LOOPBACK}:{s3}", access_key="nextgpt-test-key",
                  secret_key=uuid.uuid4().hex)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": info.access_key, "AWS_SECRET_ACCESS_KEY": info.secret_key}
    log = workdir / "weed.log"
    args = [
        _bin("weed"), "mini", f"-dir={workdir / 'data'}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
        "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
        f"-webdav.port={webdav}", f"-admin.port={admin}", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    (workdir / "data").mkdir()
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                start_new_session=True)
    try:
        client = info.client()
        wait_until(lambda: client.list_buckets() is not None, 90, "weed mini (S3)", proc, log)
        yield info
    finally:
        _stop(proc, timeout=15)
        shutil.rmtree(workdir, ignore_errors=True)


class UvicornThread:
    """An ASGI app served by uvicorn in a background thread on a free loopback port."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "uvicorn")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
