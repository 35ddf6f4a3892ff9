"""A model service whose model cannot load: never ready, liveness fails with the reason, the entry point told."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from services.web.model_app import ModelApp


def test_a_failed_load_fails_liveness_and_tells_the_entry_point() -> None:
    reasons: list[str] = []

    def load() -> object:
        raise ValueError("weights do not match")

    host = ModelApp("encoder", load, CollectorRegistry(), 1024, on_load_failure=reasons.append)  # type: ignore[arg-type]
    with TestClient(host.app) as client:
        deadline = time.monotonic() + 10
        while not reasons and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reasons == ["weights do not match"]
        live = client.get("/healthz")
        assert live.status_code == 503 and live.json()["error"]["code"] == "load_failed"
        assert "weights do not match" in live.json()["error"]["message"]
        assert client.get("/readyz").status_code == 503
