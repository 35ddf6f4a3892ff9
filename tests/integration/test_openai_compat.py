"""``/v1/chat/completions`` through the official OpenAI Python client, against the embedded stack."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from services.bundle.loader import load_bundle
from services.cli.compose import embedded_app
from services.contracts.settings import Settings
from tests.support import media
from tests.support.embedded import engines_here
from tests.support.files_server import PICTURE, files_server
from tests.support.servers import UvicornThread


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def client(tiny_bundle_dir: Path, cache_dir: Path) -> Iterator[openai.OpenAI]:
    # The encoder takes 2 items a call: history with more media must go to it in several
    settings = Settings(cache_dir=cache_dir, api_keys="sk-test,sk-other", encoder={"max_files": 2})
    with UvicornThread(embedded_app(settings, load_bundle(tiny_bundle_dir))) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=120)


def _image_url() -> str:
    return "data:image/png;base64," + base64.b64encode(media.png()).decode()


def test_models_lists_bundle_and_lora(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["nextgpt-tiny", "nextgpt"]


def test_a_model_is_retrieved_by_name(client: openai.OpenAI) -> None:
    """``models.retrieve``: what clients call to check a configured model name before they use it."""
    model = client.models.retrieve("nextgpt")
    assert (model.id, model.object, model.model_extra["root"]) == ("nextgpt", "model", "nextgpt-tiny")
    assert client.models.retrieve("nextgpt-tiny").id == "nextgpt-tiny"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_text_and_image_in_image_and_audio_out(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="nextgpt", max_tokens=30, seed=3, modalities=["text", "image", "audio"],  # type: ignore[list-item]
        messages=[{"role": "system", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "what is this? draw and say it"},
                                               {"type": "image_url", "image_url": {"url": _image_url()}}]}],
    )
    message = completion.choices[0].message
    assert completion.usage is not None and completion.usage.completion_tokens <= 30
    assert isinstance(message.content, str)  # the SDK's typed access: text stays text
    images = message.model_extra["images"]  # media beside it, as OpenRouter's image output has them
    assert images[0]["type"] == "image_url"
    assert httpx.get(images[0]["image_url"]["url"]).content.startswith(b"\x89PNG")
    assert message.audio is not None and base64.b64decode(message.audio.data)[:4] == b"RIFF"
    # The reply sent back as history, as clients do (media parts included): accepted.
    history = [{"role": "user", "content": "draw"}, message.model_dump(exclude_none=True),
               {"role": "assistant", "content": [{"type": "text", "text": "old"}, images[0]]},
               {"role": "user", "content": "again"}]
    again = client.chat.completions.create(model="nextgpt", max_tokens=4, messages=history)  # type: ignore[arg-type]
    assert isinstance(again.choices[0].message.content, str)


def test_media_it_made_come_back_from_a_stateless_history(client: openai.OpenAI, cache_dir: Path) -> None:
    """A reply's pictures, sent back as history by their artifact URLs (``message.images`` or content parts), go
    through the encoder into the prompt: the model sees what it made (the world bundle's semantics test checks it
    answers from them). URLs this server did not sign are left out of an answer's history and refused in a
    user's message."""
    made = client.chat.completions.create(model="nextgpt", max_tokens=30, seed=3, modalities=["text", "image"],  # type: ignore[list-item]
                                          messages=[{"role": "user", "content": "draw"}]).choices[0].message
    url = made.model_extra["images"][0]["image_url"]["url"]
    forged = re.sub(r"sig=(.)", lambda m: "sig=" + ("0" if m[1] != "0" else "1"), url)
    question = {"role": "user", "content": "what is it?"}

    def prompt_tokens(*messages: dict[str, object]) -> int:
        completion = client.chat.completions.create(model="nextgpt", max_tokens=1, messages=[*messages])  # type: ignore[misc]
        assert completion.usage is not None
        return completion.usage.prompt_tokens

    def answer(*media: str) -> dict[str, object]:
        return {"role": "assistant", "content": "here", "images": [{"type": "image_url", "image_url": {"url": u}}
                                                                   for u in media]}

    ask = {"role": "user", "content": "draw"}
    alone = prompt_tokens(ask, answer(), question)
    with_picture = prompt_tokens(ask, answer(url), question)
    as_part = prompt_tokens(ask, {"role": "assistant", "content": [
        {"type": "text", "text": "here"}, {"type": "image_url", "image_url": {"url": url}}]}, question)
    assert with_picture == as_part > alone
    assert prompt_tokens(ask, answer(forged), question) == alone
    assert prompt_tokens(ask, answer(url, url), question) > with_picture  # named twice, shown twice (as a file is)
    more = [client.chat.completions.create(
        model="nextgpt", max_tokens=30, seed=seed, modalities=["text", "image"],  # type: ignore[list-item]
        messages=[ask]).choices[0].message.model_extra["images"][0]["image_url"]["url"] for seed in (4, 5)]
    assert prompt_tokens(ask, answer(url, *more), question) > prompt_tokens(ask, answer(url, more[0]), question) \
        > with_picture  # three pictures: two calls of the encoder

    def about(picture: str) -> dict[str, object]:
        return {"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                            {"type": "image_url", "image_url": {"url": picture}}]}

    # A sound, by its audio.id as OpenAI's multi-turn audio sends it back: the caller's own job's only
    sound = client.chat.completions.create(model="nextgpt", max_tokens=30, seed=3, modalities=["text", "audio"],  # type: ignore[list-item]
                                           messages=[ask]).choices[0].message.audio
    assert sound is not None
    heard = prompt_tokens(ask, {"role": "assistant", "content": "here", "audio": {"id": sound.id}}, question)
    assert heard > alone
    assert prompt_tokens(ask, {"role": "assistant", "content": "here", "audio": {"id": "0" * 32}}, question) == alone
    other = openai.OpenAI(base_url=str(client.base_url), api_key="sk-other", max_retries=0)
    assert other.chat.completions.create(model="nextgpt", max_tokens=1, messages=[  # type: ignore[list-item]
        ask, {"role": "assistant", "content": "here", "audio": {"id": sound.id}}, question]).usage.prompt_tokens \
        == alone  # type: ignore[union-attr]

    assert prompt_tokens(about(url)) > prompt_tokens(question)
    with pytest.raises(openai.APIStatusError) as many:  # a user's own media past the LLM's bound: refused at once
        pictures = [{"type": "image_url", "image_url": {"url": url}}]
        prompt_tokens({"role": "user", "content": pictures * 9}, answer(), {"role": "user", "content": pictures * 8})
    assert (many.value.status_code, many.value.code, many.value.param) == (413, "too_many_media", "messages")
    with pytest.raises(openai.BadRequestError) as info:
        prompt_tokens(about(forged))
    assert (info.value.code, info.value.param) == ("invalid_artifact_url", "messages[0].content[1]")
    # Past its retention the picture is gone: an answer's history goes on without it, a user's question is a 404.
    for stored in cache_dir.rglob(url.split("?")[0].rsplit("/", 1)[-1]):
        stored.unlink()
    assert prompt_tokens(ask, answer(url), question) == alone
    with pytest.raises(openai.NotFoundError) as gone:
        prompt_tokens(about(url))
    assert gone.value.code == "artifact_not_found"


def test_developer_instructions_are_system_instructions(client: openai.OpenAI) -> None:
    """OpenAI's newer clients send instructions as "developer": folded into the first turn as "system" is."""
    def prompt_tokens(*first: dict[str, str]) -> int:
        completion = client.chat.completions.create(
            model="nextgpt", max_tokens=1, messages=[*first, {"role": "user", "content": "hello"}])  # type: ignore
        assert completion.usage is not None
        return completion.usage.prompt_tokens

    alone = prompt_tokens()
    system = prompt_tokens({"role": "system", "content": "answer in one short sentence"})
    assert system > alone
    assert prompt_tokens({"role": "developer", "content": "answer in one short sentence"}) == system


@pytest.mark.parametrize("content", ["", "   ", []])
def test_an_empty_user_message_is_refused(client: openai.OpenAI, content: object) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="nextgpt", max_tokens=4,
                                       messages=[{"role": "user", "content": content}])  # type: ignore
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "messages[0]" and "text or files" in error["message"]


def test_streamed_media_arrive_beside_the_text(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="nextgpt", max_tokens=20, stream=True, modalities=["text", "image"],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "draw"}])
    chunks = list(stream)
    assert all(isinstance(c.choices[0].delta.content, (str, type(None))) for c in chunks if c.choices)
    images = [i for c in chunks if c.choices for i in (c.choices[0].delta.model_extra or {}).get("images", [])]
    assert len(images) == 1 and httpx.get(images[0]["image_url"]["url"]).content.startswith(b"\x89PNG")


def test_streaming_text_and_audio_input(client: openai.OpenAI) -> None:
    audio = base64.b64encode(media.wav()).decode()
    stream = client.chat.completions.create(
        model="nextgpt-tiny", max_tokens=20, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
                                               {"type": "text", "text": "what do you hear"}]}],
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finishes in (["length"], ["stop"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 20


def test_usage_is_null_in_every_chunk_but_the_last(client: openai.OpenAI) -> None:
    """As OpenAI's stream with include_usage: the field is on every chunk (null), the totals on a last chunk
    without choices; every line compact JSON, the usage chunk's too."""
    body = {"model": "nextgpt-tiny", "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{client.base_url}chat/completions", json=body, timeout=60,
                      headers={"authorization": "Bearer sk-test"}) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert all(line == json.dumps(json.loads(line), separators=(",", ":")) for line in lines[:-1])


def test_errors_in_the_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="does not fetch media URLs") as off:  # the default
        client.chat.completions.create(model="nextgpt", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}]}])
    assert (off.value.code, off.value.param) == ("unsupported_url", "messages[0].content[0]")
    # What is wrong with a part names the part the client sent
    with pytest.raises(openai.APIStatusError) as status:
        client.chat.completions.create(model="nextgpt", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hi").decode()}}]}])
    assert (status.value.status_code, status.value.body["param"]) == (415, "messages[0].content[1]")  # type: ignore[index]
    assert status.value.body["message"].startswith("messages[0].content[1]: not an image")  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="nextgpt", messages=[{"role": "user", "content": [
            {"type": "text", "text": None}]}])  # type: ignore[list-item]
    assert info.value.param == "messages[0].content[0].text"  # not the text "None"
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="nextgpt", messages=[{"role": "user", "content": "hi"}])


def test_stop_ends_the_text_streamed_or_not(client: openai.OpenAI) -> None:
    ask = dict(model="nextgpt", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=30,
               temperature=0.0, seed=3, modalities=["text"])
    full = client.chat.completions.create(**ask).choices[0].message.content or ""  # type: ignore[call-overload]
    stop = full[len(full) // 2:len(full) // 2 + 4]
    assert len(full) > 12 and len(stop) == 4
    reply = client.chat.completions.create(**ask, stop=stop).choices[0]  # type: ignore[call-overload]
    assert (reply.message.content, reply.finish_reason) == (full[:full.index(stop)], "stop")
    chunks = list(client.chat.completions.create(**ask, stop=["\x00never", stop], stream=True))  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full[:full.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_any_int64_seed_is_a_seed(client: openai.OpenAI) -> None:
    """OpenAI takes any int64 as a seed and some clients send -1: a negative seed draws as reproducibly as another."""
    def reply(seed: int) -> str:
        completion = client.chat.completions.create(
            model="nextgpt", messages=[{"role": "user", "content": "surprise me"}], max_tokens=16, temperature=1.0,
            top_p=1.0, seed=seed, modalities=["text"])  # type: ignore[list-item]  # (the bundle's top_p is 0.01)
        return completion.choices[0].message.content or ""

    assert reply(-1) == reply(-1) != reply(-2)
    assert reply(-2**63) == reply(0)  # taken modulo 2**63
    with pytest.raises(openai.BadRequestError) as info:
        reply(2**63)
    assert info.value.param == "seed"


def test_top_p_zero_is_the_most_likely_token_each_time(client: openai.OpenAI) -> None:
    """OpenAI's top_p range includes 0, which clients send for determinism: it answers greedily, whatever the
    temperature and seed (a 400 before)."""
    def reply(**options: object) -> str:
        completion = client.chat.completions.create(  # type: ignore[call-overload]
            model="nextgpt", messages=[{"role": "user", "content": "surprise me"}], max_tokens=16,
            modalities=["text"], **options)
        return completion.choices[0].message.content or ""

    greedy = reply(temperature=0)
    assert reply(top_p=0, temperature=1.0, seed=1) == reply(top_p=0, temperature=2.0, seed=2) == greedy
    assert reply(top_p=1.0, temperature=2.0, seed=2) != greedy  # sampling at full width differs


def test_options_at_their_unused_values_are_accepted_and_others_refused(client: openai.OpenAI) -> None:
    ask = dict(model="nextgpt", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    reply = client.chat.completions.create(**ask, tool_choice="none", response_format={"type": "text"},  # type: ignore[call-overload]
                                           parallel_tool_calls=False, top_logprobs=0, logprobs=False)
    assert reply.usage is not None and reply.usage.completion_tokens <= 3
    # OpenAI's clients send audio={"voice", "format"} with modalities holding audio (its API requires it)
    heard = client.chat.completions.create(**{**ask, "max_tokens": 20}, modalities=["text", "audio"],  # type: ignore[call-overload]
                                           audio={"voice": "alloy", "format": "wav"})
    assert heard.choices[0].message.audio is not None
    for extra, param in ((dict(stop=["a", "b", "c", "d", "e"]), "stop"), (dict(stop=[""]), "stop.0"),
                         (dict(audio={"voice": "alloy", "format": "mp3"}), "audio.format"),
                         (dict(response_format={"type": "json_object"}), "response_format"),
                         (dict(tool_choice="auto"), "tool_choice")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**ask, **extra)  # type: ignore[call-overload]
        assert info.value.param == param, extra


def test_media_that_fail_are_said_so_streamed_or_not(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    """One decode job at most in the pool and a reply that must make three: the two the queue refuses are listed in
    ``media_errors`` with why (OpenAI's shape has no place for them: before, they were just missing)."""
    settings = engines_here(Settings(cache_dir=tmp_path, api_keys="sk-test", decoders={"max_queued": 1}))
    ask = {"model": "nextgpt", "max_tokens": 60, "seed": 4, "modalities": ["text", "image", "audio", "video"],
           "messages": [{"role": "user", "content": "make all three"}]}
    with UvicornThread(embedded_app(settings, load_bundle(tiny_bundle_dir))) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=300)
        message = client.chat.completions.create(**ask).choices[0].message  # type: ignore[call-overload]
        failed = message.model_extra["media_errors"]
        made = len(message.model_extra.get("images", [])) + len(message.model_extra.get("videos", [])) + \
            (message.audio is not None)
        assert made == 1 and len(failed) == 2, message
        assert all(f["error"].startswith("overloaded:") and len(f["job_id"]) == 32 for f in failed), failed
        assert {f["modality"] for f in failed} | {m for m in ("image", "video") if message.model_extra.get(f"{m}s")} \
            | ({"audio"} if message.audio else set()) == {"image", "audio", "video"}
        streamed = [c.choices[0].delta.model_extra.get("media_errors") for c in
                    client.chat.completions.create(**ask, stream=True) if c.choices]  # type: ignore[call-overload]
        assert [f["error"].split(":")[0] for chunk in streamed if chunk for f in chunk] == ["overloaded"] * 2


def test_media_by_url_are_fetched_where_the_operator_allows(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    """With ``media_url_fetch`` on, an ``image_url`` part's http(s) URL is fetched: the model gets what the same
    picture as a data URL gives it. A private address (this test's server is on loopback) only with
    ``media_url_private``; a URL that fails is a 400 naming the part."""
    settings = engines_here(Settings(cache_dir=tmp_path, gateway={"media_url_fetch": True, "media_url_private": True}))
    with files_server() as port, UvicornThread(embedded_app(settings, load_bundle(tiny_bundle_dir))) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)

        def prompt_tokens(url: str | None) -> int:
            parts: list[dict[str, object]] = [{"type": "text", "text": "what is it?"}]
            if url:
                parts.append({"type": "image_url", "image_url": {"url": url}})
            usage = client.chat.completions.create(model="nextgpt", max_tokens=1, messages=[  # type: ignore[list-item]
                {"role": "user", "content": parts}]).usage
            assert usage is not None
            return usage.prompt_tokens

        as_data = "data:image/png;base64," + base64.b64encode(PICTURE).decode()
        assert prompt_tokens(f"http://127.0.0.1:{port}/pic.png") == prompt_tokens(as_data) > prompt_tokens(None)
        with pytest.raises(openai.BadRequestError) as missing:
            prompt_tokens(f"http://127.0.0.1:{port}/missing")
        assert (missing.value.code, missing.value.param) == ("media_url_failed", "messages[0].content[1]")
    private = engines_here(Settings(cache_dir=tmp_path, gateway={"media_url_fetch": True}))
    with UvicornThread(embedded_app(private, load_bundle(tiny_bundle_dir))) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="nextgpt", max_tokens=1, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}}]}])
        assert refused.value.code == "media_url_not_allowed"
