"""HTTP details a client may rely on: HEAD wherever GET works, byte ranges as RFC 9110 reads them, the auth
scheme in any case, and JSON types taken as they are (no boolean as a number)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.bundle.loader import load_bundle
from services.cli.compose import embedded_app
from services.contracts.settings import Settings
from tests.support.embedded import engines_here
from tests.support.servers import UvicornThread

KEY = "protocol-key"


@pytest.fixture(scope="module")
def url(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = engines_here(Settings(cache_dir=tmp_path_factory.mktemp("cache"), api_keys=KEY))
    with UvicornThread(embedded_app(settings, load_bundle(tiny_bundle_dir))) as server:
        yield server.url


@pytest.fixture(scope="module")
def artifact_url(url: str) -> str:
    reply = httpx.post(f"{url}/v1/chat", headers={"authorization": f"Bearer {KEY}"}, timeout=120, json={
        "messages": [{"role": "user", "content": "a picture"}], "max_tokens": 12, "seed": 1,
        "require_modalities": ["image"], "decoder": {"steps": 1}})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["artifacts"][0]["url"])


def test_head_works_where_get_does(url: str, artifact_url: str) -> None:
    get = httpx.get(artifact_url)
    head = httpx.head(artifact_url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
    assert head.headers["content-type"] == "image/png"
    assert httpx.head(f"{url}/healthz").status_code == 200
    assert httpx.head(f"{url}/readyz").status_code == 200


def test_ranges_in_other_units_are_ignored_and_huge_offsets_are_refused(artifact_url: str) -> None:
    size = len(httpx.get(artifact_url).content)
    whole = httpx.get(artifact_url, headers={"range": "items=0-1"})
    assert whole.status_code == 200 and len(whole.content) == size
    huge = httpx.get(artifact_url, headers={"range": "bytes=" + "9" * 5000 + "-"})
    assert huge.status_code == 416 and huge.headers["content-range"] == f"bytes */{size}"
    # Refusals in the shared error shape, like every other 4xx: a past-the-end range and a malformed one.
    for asked in ("bytes=" + "9" * 5000 + "-", f"bytes={size}-", "bytes=abc", "bytes=-"):
        refused = httpx.get(artifact_url, headers={"range": asked})
        assert refused.status_code == 416 and refused.headers["content-range"] == f"bytes */{size}", asked
        assert refused.json()["error"]["code"] == "range_not_satisfiable" and refused.json()["error"]["param"] == "Range"
    part = httpx.get(artifact_url, headers={"range": "bytes=0-9"})
    assert part.status_code == 206 and len(part.content) == 10


def test_the_bearer_scheme_is_case_insensitive(url: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert httpx.post(f"{url}/v1/chat", json=body, headers={"authorization": f"{scheme} {KEY}"},
                          timeout=60).status_code == 200
    wrong = httpx.post(f"{url}/v1/chat", json=body, headers={"authorization": "Basic " + KEY}, timeout=60)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "missing_api_key"


@pytest.mark.parametrize("path", ["/v1/chat", "/v1/chat/completions"])
def test_a_boolean_is_not_a_token_budget(url: str, path: str) -> None:
    body = {"model": "nextgpt-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": True}
    reply = httpx.post(f"{url}{path}", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert reply.status_code == 400, reply.text
    assert "max_tokens" in reply.text


WAV = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAgD4AAAB9AAACABAAZGF0YQAAAAA="  # an empty 16 kHz WAV


@pytest.mark.parametrize(("messages", "param"), [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "not a data url"}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": WAV}]}], "messages[0].content[0]"),
    ([{"role": "system", "content": "be brief"}], "messages"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "messages"),
    ([{"role": "user", "content": "x" * 100_001}], "messages[0].content"),
])
def test_openai_requests_that_do_not_translate_are_400s(url: str, messages: list[object], param: str) -> None:
    reply = httpx.post(f"{url}/v1/chat/completions", json={"model": "nextgpt-tiny", "messages": messages},
                       headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


@pytest.mark.parametrize(("option", "value"), [("tool_choice", "auto"), ("tools", [{"type": "function"}]),
                                               ("presence_penalty", 0.5), ("logprobs", True), ("n", 2),
                                               # our answers name it; sent back here it was ignored (no history)
                                               ("conversation_id", "0123456789abcdef0123456789abcdef")])
def test_openai_options_not_honoured_are_refused_by_name(url: str, option: str, value: object) -> None:
    body = {"model": "nextgpt-tiny", "messages": [{"role": "user", "content": "hi"}], option: value}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == option
