"""The LLM service over real HTTP: streaming, 4xx before the stream, cancellation when the client leaves."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.bundle.loader import load_bundle
from services.clients.llm_http import HttpLLMClient
from services.contracts.errors import InvalidRequestError
from services.contracts.llm import Done, GenerateParams, GenerateRequest, SignalEvent, TextDelta, Turn, media_to_b64
from services.contracts.settings import LLMSettings
from services.llm.app import build_llm_app
from services.llm.compose import build_llm_service
from tests.support.servers import UvicornThread, wait_until

MEDIA = np.random.default_rng(1).standard_normal((2, 128)).astype(np.float32)


@pytest.fixture(scope="module")
def url(tiny_bundle_dir: Path) -> Iterator[str]:
    registry = CollectorRegistry()
    settings = LLMSettings(max_tokens=2000, max_media=4)
    app = build_llm_app(lambda: build_llm_service(load_bundle(tiny_bundle_dir), settings, registry), registry)
    with UvicornThread(app) as server:
        wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, 120, "llm ready")
        yield server.url


def _params(**kw: object) -> GenerateParams:
    turns = [Turn(role="user", text="a picture and a sound please", media=[0, 1])]
    return GenerateParams(turns=turns, seed=11, **kw)  # type: ignore[arg-type]


async def test_stream_over_http(url: str) -> None:
    client = HttpLLMClient(url, httpx.AsyncClient())
    events = [e async for e in client.generate(_params(max_tokens=60, require_modalities=["image", "audio"]), MEDIA)]
    assert isinstance(events[-1], Done) and events[-1].finish_reason in ("stop", "length")
    signals = {e.modality: e.conditioning.shape for e in events if isinstance(e, SignalEvent)}
    assert signals == {"image": (77, 32), "audio": (24,)}
    assert any(isinstance(e, TextDelta) for e in events)
    again = [e async for e in client.generate(_params(max_tokens=60, require_modalities=["image", "audio"]), MEDIA)]
    assert isinstance(again[-1], Done) and again[-1].token_ids == events[-1].token_ids  # same seed, same reply


async def test_request_errors_are_4xx_before_streaming(url: str) -> None:
    client = HttpLLMClient(url, httpx.AsyncClient())
    with pytest.raises(InvalidRequestError, match="max_tokens 3000 exceeds"):
        [e async for e in client.generate(_params(max_tokens=3000), MEDIA)]
    with pytest.raises(InvalidRequestError, match="unknown LoRA"):
        [e async for e in client.generate(_params(lora="other"), MEDIA)]
    with pytest.raises(InvalidRequestError, match="media vectors"):
        [e async for e in client.generate(_params(), np.zeros((2, 5), np.float32))]
    bad = httpx.post(f"{url}/v1/generate", json={"params": {"turns": [{"role": "assistant", "text": "x"}]}})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    many = GenerateRequest(params=_params(), media=media_to_b64(np.zeros((5, 128), np.float32)))
    too_many = httpx.post(f"{url}/v1/generate", content=many.model_dump_json(), headers={"content-type": "application/json"})
    assert too_many.status_code == 413


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_client_disconnect_cancels_generation(url: str) -> None:
    body = GenerateRequest(params=_params(max_tokens=2000), media=media_to_b64(MEDIA))
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/generate", content=body.model_dump_json(),
                      headers={"content-type": "application/json"}) as response:
        first = json.loads(next(response.iter_lines()))
        assert first["type"] in ("delta", "signal")
    # The connection is closed after one event: the generation must stop and free the model.
    wait_until(lambda: _metric(url, "nextgpt_llm_running") == 0, 10, "generation stopped")
    wait_until(lambda: _metric(url, 'nextgpt_llm_requests_total{outcome="disconnected"}') >= 1, 10, "counted")
    assert time.perf_counter() - started < 6  # 2000 tokens would take far longer on this machine
    quick = httpx.post(f"{url}/v1/generate", content=GenerateRequest(params=_params(max_tokens=3),
                       media=media_to_b64(MEDIA)).model_dump_json(), headers={"content-type": "application/json"})
    assert quick.status_code == 200 and json.loads(quick.text.strip().splitlines()[-1])["type"] == "done"
