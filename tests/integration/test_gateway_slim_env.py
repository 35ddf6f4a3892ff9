"""The slim gateway image's environment, for real: a virtualenv with only deploy/docker/requirements-gateway.txt
(no torch, no model libraries; `make gateway-env` builds it, again whenever the list changes), the project's code
on the path, and the gateway serving from it in distributed mode. Proves the list is enough, and that the gateway
never needs torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.servers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
GATEWAY_PYTHON = os.environ.get("NEXTGPT_TEST_GATEWAY_PYTHON")


@pytest.mark.skipif(not GATEWAY_PYTHON, reason="NEXTGPT_TEST_GATEWAY_PYTHON not set (make test sets it)")
def test_the_gateway_serves_from_its_requirement_list_alone(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    python = Path(GATEWAY_PYTHON or "")
    missing = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert missing.returncode != 0, "the slim environment must not have torch"
    port = free_port()
    env = {
        "PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "NEXTGPT_BUNDLE": str(tiny_bundle_dir.resolve()),
        "NEXTGPT_CACHE_DIR": str(tmp_path), "NEXTGPT_ENCODER__URL": "http://127.0.0.1:9",
        "NEXTGPT_LLM__URL": "http://127.0.0.1:9", "NEXTGPT_REDIS__URL": f"redis://127.0.0.1:{free_port()}/0",
        "NEXTGPT_STORAGE__BACKEND": "s3", "NEXTGPT_STORAGE__S3_BUCKET": "artifacts",
        "NEXTGPT_STORAGE__S3_ENDPOINT_URL": "http://127.0.0.1:9",
    }
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(python), "-c", "from services.cli.main import main; main()", "gateway", "serve",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base}/healthz").status_code == 200, 60, "slim gateway", proc, log)
        # Up, and honest about its dependencies being away (nothing listens on them here).
        ready = httpx.get(f"{base}/readyz", timeout=30)
        assert ready.status_code == 503 and "encoder" in ready.json()["error"]["message"]
        assert "/v1/chat" in httpx.get(f"{base}/openapi.json").json()["paths"]
        assert httpx.get(f"{base}/").headers["content-type"].startswith("text/html")
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert sys.executable != str(python)
