from __future__ import annotations

from fastapi.testclient import TestClient

from gateway.app import GatewayState, ModelCard, build_app
from services.contracts.errors import ServiceUnavailableError


def _fail() -> None:
    raise ServiceUnavailableError("bucket gone", code="storage_unavailable")


def test_readyz_reports_each_failed_dependency() -> None:
    app = build_app(GatewayState(models=[ModelCard(id="m")], readiness_checks={"store": _fail, "ok": lambda: None}))
    response = TestClient(app).get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"] == {"type": "service_unavailable", "code": "not_ready",
                                        "message": "store: bucket gone", "param": None}


def test_unknown_route_and_method_use_the_error_shape() -> None:
    client = TestClient(build_app(GatewayState(models=[], readiness_checks={})))
    assert client.get("/nope").json()["error"]["code"] == "not_found"
    wrong = client.post("/healthz")
    assert wrong.status_code == 405 and set(wrong.json()["error"]) == {"type", "code", "message", "param"}


def test_gateway_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, gateway.app, services.web.errors; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
