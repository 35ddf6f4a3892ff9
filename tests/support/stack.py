"""The distributed stack as separate processes (encoder, LLM, gateway replicas, a Celery worker) on loopback,
for end-to-end tests, benchmarks and fault tests."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.contracts.settings import StorageSettings
from services.storage.s3 import S3ArtifactStore
from tests.support.processes import ServiceProcess
from tests.support.servers import S3Info, free_port
from tests.support.workers import WorkerProcess

KEY = "e2e-key"


@dataclass
class Stack:
    url: str
    url2: str
    services: dict[str, ServiceProcess]
    worker: WorkerProcess
    env: dict[str, str]
    logs: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {KEY}"}


@contextlib.contextmanager
def distributed_stack(redis_url: str, key_prefix: str, s3: S3Info, bundle: Path, logs: Path,
                      extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    S3ArtifactStore.from_settings(StorageSettings(
        backend="s3", s3_endpoint_url=s3.endpoint_url, s3_bucket=bucket, s3_access_key_id=s3.access_key,
        s3_secret_access_key=s3.secret_key, s3_create_bucket=True))
    ports = {name: free_port() for name in ("encoder", "llm", "gateway", "gateway2")}
    env = {
        "NEXTGPT_BUNDLE": str(bundle),
        "NEXTGPT_REDIS__URL": redis_url, "NEXTGPT_REDIS__KEY_PREFIX": key_prefix,
        "NEXTGPT_STORAGE__BACKEND": "s3", "NEXTGPT_STORAGE__S3_ENDPOINT_URL": s3.endpoint_url,
        "NEXTGPT_STORAGE__S3_BUCKET": bucket, "NEXTGPT_STORAGE__S3_ACCESS_KEY_ID": s3.access_key,
        "NEXTGPT_STORAGE__S3_SECRET_ACCESS_KEY": s3.secret_key,
        "NEXTGPT_ENCODER__URL": f"http://127.0.0.1:{ports['encoder']}",
        "NEXTGPT_LLM__URL": f"http://127.0.0.1:{ports['llm']}",
        "NEXTGPT_API_KEYS": KEY, "NEXTGPT_GATEWAY__URL_SIGNING_KEY": "e2e-signing-key",
        "NEXTGPT_ENCODER__TIMEOUT_S": "30",
        **(extra_env or {}),
    }
    services = {
        "encoder": ServiceProcess(["encoder", "serve", "--port", str(ports["encoder"])], env, logs / "encoder.log",
                                  f"http://127.0.0.1:{ports['encoder']}/readyz"),
        "llm": ServiceProcess(["llm", "serve", "--port", str(ports["llm"])], env, logs / "llm.log",
                              f"http://127.0.0.1:{ports['llm']}/readyz"),
        "gateway": ServiceProcess(["gateway", "serve", "--port", str(ports["gateway"])], env, logs / "gateway.log",
                                  f"http://127.0.0.1:{ports['gateway']}/healthz"),
        # A second replica behind the same Redis: streams and conversations move between replicas.
        "gateway2": ServiceProcess(["gateway", "serve", "--port", str(ports["gateway2"])], env,
                                   logs / "gateway2.log", f"http://127.0.0.1:{ports['gateway2']}/healthz"),
    }
    for service in services.values():
        service.start()
    worker = WorkerProcess("image,video,audio", env, logs / "worker.log")
    try:
        for service in services.values():
            service.wait_ready()
        worker.wait_ready()
        yield Stack(f"http://127.0.0.1:{ports['gateway']}", f"http://127.0.0.1:{ports['gateway2']}", services,
                    worker, env, logs)
    finally:
        worker.stop()
        for service in services.values():
            service.stop()
