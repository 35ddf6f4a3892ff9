"""The LLM service over real HTTP: streaming, 4xx before the stream, cancellation when the client leaves."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.bundle.loader import load_bundle
from services.clients.llm_http import HttpLLMClient
from services.contracts.errors import InvalidRequestError, ServiceUnavailableError
from services.contracts.llm import (
    Accepted, Done, GenerateParams, GenerateRequest, SignalEvent, TextDelta, Turn, event_to_json, media_to_b64,
)
from services.contracts.settings import LLMSettings
from services.llm.app import build_llm_app
from services.llm.compose import build_llm_service
from tests.support.metrics import metric
from tests.support.servers import UvicornThread, free_port, wait_until

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
    client = HttpLLMClient(url)
    await client.check_ready()
    events = [e async for e in client.generate(_params(max_tokens=60, require_modalities=["image", "audio"]), MEDIA)]
    assert isinstance(events[-1], Done) and events[-1].finish_reason in ("stop", "length")
    # Taken before the prefill (the caller may answer its own client from here), with the prompt it measured.
    assert isinstance(events[0], Accepted) and events[0].prompt_tokens == events[-1].prompt_tokens
    assert not any(isinstance(e, Accepted) for e in events[1:])
    signals = {e.modality: e.conditioning.shape for e in events if isinstance(e, SignalEvent)}
    assert signals == {"image": (77, 32), "audio": (24,)}
    assert any(isinstance(e, TextDelta) for e in events)
    again = [e async for e in client.generate(_params(max_tokens=60, require_modalities=["image", "audio"]), MEDIA)]
    assert isinstance(again[-1], Done) and again[-1].token_ids == events[-1].token_ids  # same seed, same reply
    await client.aclose()


async def test_the_reply_text_is_its_tokens_decoded_without_the_whitespace_around(url: str, tiny_bundle_dir: Path
                                                                                  ) -> None:
    """The service trims what the model writes around its answer (a leading space, a trailing newline), nothing
    inside it."""
    from transformers import AutoTokenizer

    bundle = load_bundle(tiny_bundle_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(bundle.path(bundle.manifest.llm.path)))
    skip = {i for spec in bundle.manifest.outputs.values() for i in spec.signal.token_ids}
    skip |= set(bundle.manifest.stop.token_ids)
    client = HttpLLMClient(url)
    trimmed = 0
    for seed in range(6):
        params = GenerateParams(turns=[Turn(role="user", text="say something")], seed=seed, max_tokens=40,
                                temperature=1.0, allowed_modalities=[])
        events = [e async for e in client.generate(params, None)]
        done = events[-1]
        assert isinstance(done, Done)
        raw = tokenizer.decode([t for t in done.token_ids if t not in skip], skip_special_tokens=True)
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        assert text == raw.strip()
        trimmed += text != raw
    assert trimmed, "no reply of these seeds began or ended with whitespace: the check checked nothing"
    await client.aclose()


async def test_request_errors_are_4xx_before_streaming(url: str) -> None:
    client = HttpLLMClient(url)
    with pytest.raises(InvalidRequestError, match="max_tokens 3000 exceeds"):
        [e async for e in client.generate(_params(max_tokens=3000), MEDIA)]
    with pytest.raises(InvalidRequestError, match="unknown LoRA"):
        [e async for e in client.generate(_params(lora="other"), MEDIA)]
    with pytest.raises(InvalidRequestError, match="media vectors"):
        [e async for e in client.generate(_params(), np.zeros((2, 5), np.float32))]
    await client.aclose()
    bad = httpx.post(f"{url}/v1/generate", json={"params": {"turns": [{"role": "assistant", "text": "x"}]}})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    many = GenerateRequest(params=_params(), media=media_to_b64(np.zeros((5, 128), np.float32)))
    too_many = httpx.post(f"{url}/v1/generate", content=many.model_dump_json(), headers={"content-type": "application/json"})
    assert too_many.status_code == 413


def test_client_disconnect_cancels_generation(url: str) -> None:
    body = GenerateRequest(params=_params(max_tokens=2000), media=media_to_b64(MEDIA))
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/generate", content=body.model_dump_json(),
                      headers={"content-type": "application/json"}) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["type"] == "accepted"
        assert json.loads(next(lines))["type"] in ("delta", "signal")
    # The connection is closed after one event: the generation must stop and free the model.
    wait_until(lambda: metric(url, "nextgpt_llm_running") == 0, 10, "generation stopped")
    wait_until(lambda: metric(url, 'nextgpt_llm_requests_total{outcome="disconnected"}') >= 1, 10, "counted")
    assert time.perf_counter() - started < 6  # 2000 tokens would take far longer on this machine
    quick = httpx.post(f"{url}/v1/generate", content=GenerateRequest(params=_params(max_tokens=3),
                       media=media_to_b64(MEDIA)).model_dump_json(), headers={"content-type": "application/json"})
    assert quick.status_code == 200 and json.loads(quick.text.strip().splitlines()[-1])["type"] == "done"


async def test_leaving_the_client_stream_early_stops_the_generation(url: str) -> None:
    """The gateway closes its iterator when its client goes: the connection must close (not go back to the pool
    half read), so that the service stops generating."""
    client = HttpLLMClient(url)
    before = metric(url, 'nextgpt_llm_requests_total{outcome="disconnected"}')
    stream = client.generate(_params(max_tokens=2000), MEDIA)
    assert isinstance(await anext(stream), Accepted)
    assert isinstance(await anext(stream), (TextDelta, SignalEvent))
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.sleep(0.1)  # the socket closes on the event loop's next turns (wait_until below blocks it)
    wait_until(lambda: metric(url, "nextgpt_llm_running") == 0, 10, "generation stopped")
    wait_until(lambda: metric(url, 'nextgpt_llm_requests_total{outcome="disconnected"}') > before, 10, "counted")
    # The client is still usable afterwards, on a fresh connection.
    events = [e async for e in client.generate(_params(max_tokens=3), MEDIA)]
    assert isinstance(events[-1], Done)
    await client.aclose()


async def test_an_unreachable_service_is_a_503_error() -> None:
    port = free_port()
    client = HttpLLMClient(f"http://127.0.0.1:{port}")
    with pytest.raises(ServiceUnavailableError) as caught:
        [e async for e in client.generate(_params(max_tokens=3), MEDIA)]
    assert caught.value.code == "llm_unavailable"
    # The answer may reach a public client: where the service lives stays in the log (it read "Cannot connect to
    # host 127.0.0.1:<port> ssl:default [Connect call failed ...]").
    assert caught.value.message == "llm is unreachable (cannot connect); retry later"
    with pytest.raises(ServiceUnavailableError):
        await client.check_ready()
    await client.aclose()


async def test_a_service_that_takes_the_connection_and_never_answers_is_a_503_within_the_accept_bound() -> None:
    # A listening socket nobody accepts from: the kernel completes the handshake and takes the request's bytes, as
    # it does for a stopped process or a pod that hung with its port open.
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:
        client = HttpLLMClient(f"http://127.0.0.1:{silent.getsockname()[1]}", accept_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError, match="did not answer the request within 0.5 s") as caught:
            [e async for e in client.generate(_params(max_tokens=3), MEDIA)]
        assert caught.value.code == "llm_unavailable" and time.monotonic() - started < 5
        await client.aclose()


def _answers_then_waits_app(wait_s: float) -> object:
    """An LLM service stand-in that answers at once (as ``accepted`` does) and sends its reply ``wait_s`` later, as a
    turn waiting in the service's queue for its first token."""
    lines = [event_to_json(Accepted(prompt_tokens=3)), event_to_json(TextDelta(text="a")),
             event_to_json(Done(finish_reason="stop", prompt_tokens=3, completion_tokens=1))]

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                    "headers": [(b"content-type", b"application/x-ndjson")]})
        first = (json.dumps(lines[0]) + "\n").encode()
        await send({"type": "http.response.body", "body": first, "more_body": True})  # type: ignore[operator]
        await asyncio.sleep(wait_s)
        body = "".join(json.dumps(line) + "\n" for line in lines[1:]).encode()
        await send({"type": "http.response.body", "body": body, "more_body": False})  # type: ignore[operator]

    return app


async def test_the_accept_bound_does_not_cut_a_reply_that_waits_after_it_was_accepted() -> None:
    with UvicornThread(_answers_then_waits_app(1.5)) as server:
        client = HttpLLMClient(server.url, accept_timeout_s=0.5)
        events = [e async for e in client.generate(_params(max_tokens=3), None)]
        await client.aclose()
    assert [type(e).__name__ for e in events] == ["Accepted", "TextDelta", "Done"]


BIG = np.random.default_rng(2).standard_normal((77, 1024)).astype(np.float32)  # real-size conditioning, ~420 KB


def _chunked_stream_app(chunk: int, done: bool = True) -> object:
    """An LLM service stand-in whose stream arrives in ``chunk``-byte pieces: lines split anywhere, several lines in
    one piece, a signal line far over aiohttp's own readline limit, and a last line without its newline (``done``
    False: the body ends in good order before the reply's ``done``)."""
    lines = [event_to_json(TextDelta(text="a")), event_to_json(SignalEvent(modality="image", index=0,
                                                                            conditioning=BIG)),
             event_to_json(TextDelta(text="b"))]
    if done:
        lines.append(event_to_json(Done(finish_reason="stop", prompt_tokens=3, completion_tokens=3)))
    body = ("\n\n".join(json.dumps(line) for line in lines)).encode()

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                    "headers": [(b"content-type", b"application/x-ndjson")]})
        for start in range(0, len(body), chunk):
            await send({"type": "http.response.body", "body": body[start:start + chunk],  # type: ignore[operator]
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})  # type: ignore[operator]

    return app


@pytest.mark.parametrize("chunk", [7, 4096, 1 << 20])
async def test_lines_are_found_whatever_the_pieces_they_arrive_in(chunk: int) -> None:
    with UvicornThread(_chunked_stream_app(chunk)) as server:
        client = HttpLLMClient(server.url)
        events = [e async for e in client.generate(_params(max_tokens=3), None)]
        await client.aclose()
    assert [type(e).__name__ for e in events] == ["TextDelta", "SignalEvent", "TextDelta", "Done"]
    assert isinstance(events[1], SignalEvent) and np.array_equal(events[1].conditioning, BIG)


async def test_a_stream_that_ends_before_the_reply_did_is_a_503() -> None:
    """A body that ends in good order without the reply's ``done`` (a proxy between the services closing it on an
    upstream reset) fails the turn as a broken stream does (it reached the chat turn's assertion before: an
    internal error and a traceback in the gateway's log)."""
    with UvicornThread(_chunked_stream_app(4096, done=False)) as server:
        client = HttpLLMClient(server.url)
        events = []
        with pytest.raises(ServiceUnavailableError, match="ended before the reply did") as failed:
            async for event in client.generate(_params(max_tokens=3), None):
                events.append(event)
        await client.aclose()
    assert failed.value.code == "llm_unavailable"
    assert [type(e).__name__ for e in events] == ["TextDelta", "SignalEvent", "TextDelta"]
