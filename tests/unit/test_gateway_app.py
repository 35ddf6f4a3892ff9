from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from gateway.app import PROBE_TIMEOUT_S, GatewayState, ModelCard, build_app
from services.contracts.chat import ChatRequest
from services.contracts.errors import InvalidRequestError, ServiceUnavailableError, invalid_fields


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


def test_request_ids_are_echoed_or_made() -> None:
    client = TestClient(build_app(GatewayState(models=[], readiness_checks={})))
    assert client.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.get("/healthz", headers={"x-request-id": "bad id with spaces"}).headers["x-request-id"]
    assert len(made) == 32 and made != "bad id with spaces"


def test_cors_preflight_when_configured() -> None:
    from services.contracts.settings import GatewaySettings

    state = GatewayState(models=[], readiness_checks={}, settings=GatewaySettings(cors_origins=["https://app.test"]))
    response = TestClient(build_app(state)).options("/v1/models", headers={
        "origin": "https://app.test", "access-control-request-method": "GET"})
    assert response.headers["access-control-allow-origin"] == "https://app.test"
    # A browser on that origin may read the headers it needs to resume or cancel a stream, and Retry-After.
    exposed = TestClient(build_app(state)).get("/v1/models", headers={"origin": "https://app.test"}).headers
    assert {"x-stream-id", "x-conversation-id", "retry-after"} <= \
        {h.strip() for h in exposed["access-control-expose-headers"].split(",")}
    plain = TestClient(build_app(GatewayState(models=[], readiness_checks={}))).get(
        "/v1/models", headers={"origin": "https://evil.test"})
    assert "access-control-allow-origin" not in plain.headers


def test_rate_limit_per_caller() -> None:
    import pytest

    from gateway.ratelimit import RateLimiter
    from services.contracts.errors import RateLimitError

    limiter = RateLimiter(per_minute=60, burst=2)
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(RateLimitError, match="retry in"):
        limiter.check("a")
    limiter.check("b")  # another caller has its own bucket
    RateLimiter(None).check("a")


def test_artifact_base_url_behind_a_trusted_proxy() -> None:
    from starlette.requests import Request

    from gateway.routes import _base_url
    from services.contracts.settings import GatewaySettings

    def request(client: str, headers: dict[str, str]) -> Request:
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        return Request({"type": "http", "scheme": "http", "server": ("10.0.0.5", 8000), "path": "/v1/chat",
                        "root_path": "", "headers": raw, "client": (client, 1234), "query_string": b""})

    forwarded = {"x-forwarded-proto": "https", "x-forwarded-host": "api.example.com",
                 "x-forwarded-prefix": "/nextgpt"}
    trusting = GatewayState(models=[], readiness_checks={}, settings=GatewaySettings(
        trusted_proxies=["10.0.0.1"], allowed_hosts=["10.0.0.5", "*.example.org"]))
    assert _base_url(request("10.0.0.1", forwarded), trusting) == "https://api.example.com/nextgpt"
    # The same headers from anyone else are ignored: no link injection through a forged header.
    assert _base_url(request("6.6.6.6", forwarded), trusting) == "http://10.0.0.5:8000"
    bad = {"x-forwarded-proto": "javascript", "x-forwarded-host": "evil.com/path?x", "x-forwarded-prefix": "/a b"}
    assert _base_url(request("10.0.0.1", bad), trusting) == "http://10.0.0.5:8000"
    # Nor does a Host header outside the allowed hosts shape links: they stay relative.
    assert _base_url(request("6.6.6.6", {"host": "evil.example"}), trusting) == ""
    assert _base_url(request("6.6.6.6", {"host": "api.example.org:8443"}), trusting) == "http://api.example.org:8443"
    assert _base_url(request("6.6.6.6", {"host": "example.org.evil.example"}), trusting) == ""
    default = GatewayState(models=[], readiness_checks={}, settings=GatewaySettings())
    assert _base_url(request("127.0.0.1", {"host": "localhost:8000"}), default) == "http://localhost:8000"
    assert _base_url(request("127.0.0.1", {"host": "evil.example"}), default) == ""
    fixed = GatewayState(models=[], readiness_checks={},
                         settings=GatewaySettings(public_base_url="https://public.example/", trusted_proxies=["10.0.0.1"]))
    assert _base_url(request("10.0.0.1", forwarded), fixed) == "https://public.example"


def test_url_signatures_refuse_garbage_without_crashing() -> None:
    import pytest

    from gateway.security import UrlSigner
    from services.contracts.errors import PermissionDeniedError

    signer = UrlSigner(b"k" * 32, 60)
    path, query = signer.sign("/v1/artifacts/image/2026/01/01/ab.png").split("?")
    expires = int(query.split("&")[0].split("=")[1])
    signer.verify(path, expires, query.split("sig=")[1])
    for sig in ("é" * 64, "\udcff", "", "00"):
        with pytest.raises(PermissionDeniedError):
            signer.verify(path, expires, sig)


def test_readiness_answers_within_its_bound_when_a_dependency_hangs() -> None:
    import time

    async def hangs() -> None:
        await asyncio.sleep(30)

    def blocks() -> None:
        time.sleep(5)

    state = GatewayState(models=[], readiness_checks={"redis": hangs, "encoder": blocks, "ok": lambda: None})
    with TestClient(build_app(state)) as client:
        started = time.monotonic()
        response = client.get("/readyz")
        took = time.monotonic() - started
    assert response.status_code == 503 and took < PROBE_TIMEOUT_S + 1.5
    message = response.json()["error"]["message"]
    assert "redis: no answer within 2 s" in message and "encoder: no answer" in message and "ok" not in message


def test_a_lone_surrogate_escape_is_a_400_that_says_what_is_wrong() -> None:
    """Text cut in the middle of an emoji (JavaScript slices UTF-16) leaves half a surrogate pair in the JSON."""
    def refusal(escapes: str) -> InvalidRequestError:
        raw = '{"messages": [{"role": "user", "content": "hi ' + escapes + '"}], "max_tokens": 0}'
        with pytest.raises(ValidationError) as caught:
            ChatRequest.model_validate_json(raw)
        return invalid_fields(caught.value)

    for alone in ("\\ud83d", "\\ude00", "\\ud83d x"):
        error = refusal(alone)
        assert error.status_code == 400 and "surrogate pair" in error.message, error.message
    whole = refusal("\\ud83d\\ude00")  # a whole pair parses: what is refused is max_tokens
    assert whole.param == "max_tokens" and "surrogate" not in whole.message


@pytest.mark.parametrize("error", ["ConnectionError", "TimeoutError"])
def test_redis_unreachable_is_a_503_to_retry_without_its_address(error: str) -> None:
    import redis.exceptions

    app = build_app(GatewayState(models=[], readiness_checks={}))

    @app.get("/uses-redis")
    async def uses_redis() -> None:
        raise getattr(redis.exceptions, error)("Timeout reading from 10.0.3.7:6379")

    response = TestClient(app, raise_server_exceptions=False).get("/uses-redis")
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "redis_unavailable" and "10.0.3.7" not in response.text
