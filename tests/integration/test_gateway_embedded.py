"""The embedded stack (gateway + encoder + LLM + decoders in one process) over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import pytest
import soundfile
from PIL import Image

from services.bundle.loader import load_bundle
from services.cli.compose import embedded_app
from services.contracts.settings import Settings
from tests.support import media
from tests.support.chat import first_job_id, read_events, read_until_job, wait_for_job_state
from tests.support.embedded import engines_here
from tests.support.metrics import metric, samples as metric_samples
from tests.support.servers import UvicornThread, wait_until

KEY = "test-key-1"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def url(tiny_bundle_dir: Path, cache_dir: Path) -> Iterator[str]:
    settings = Settings(cache_dir=cache_dir, api_keys=f"{KEY},other-key",
                        gateway={"max_files": 4, "max_upload_bytes": 3_000_000, "heartbeat_s": 1.0,
                                 "resume_grace_s": 3.0})
    with UvicornThread(embedded_app(settings, load_bundle(tiny_bundle_dir))) as server:
        yield server.url


def _auth(key: str = KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_streaming_chat_with_uploads_and_all_modalities(url: str) -> None:
    request = {"messages": [{"role": "user", "content": "make all three", "files": ["a.png", "b.wav", "c.mp4"]}],
               "stream": True, "max_tokens": 60, "seed": 4, "require_modalities": ["image", "video", "audio"],
               "decoder": {"steps": 2}}
    files = [("files", ("a.png", media.png(), "image/png")), ("files", ("b.wav", media.wav(), "audio/wav")),
             ("files", ("c.mp4", media.mp4(), "video/mp4"))]
    with httpx.stream("POST", f"{url}/v1/chat", data={"request": json.dumps(request)}, files=files,
                      headers=_auth(), timeout=300) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        conversation_id = response.headers["x-conversation-id"]  # known before the stream's end
        events = read_events(response)
    names = [n for n, _ in events]
    assert names[-1] == "done" and "message.delta" in names and events[-1][1]["conversation_id"] == conversation_id
    assert sorted(d["modality"] for n, d in events if n == "signal") == ["audio", "image", "video"]
    assert names.index("artifact.queued") < names.index("done")
    completed = [d for n, d in events if n == "artifact.completed"]
    assert sorted(d["modality"] for d in completed) == ["audio", "image", "video"]
    for artifact in completed:
        data = httpx.get(str(artifact["url"])).content  # signed URL: no key needed
        if artifact["modality"] == "image":
            assert Image.open(io.BytesIO(data)).format == "PNG"
        elif artifact["modality"] == "video":
            with av.open(io.BytesIO(data)) as container:
                assert container.streams.video[0].codec_context.name == "h264"
        else:
            assert soundfile.read(io.BytesIO(data))[1] == 16000
    done = events[-1][1]
    assert done["usage"]["completion_tokens"] <= 60 and len(done["artifacts"]) == 3


def test_json_chat_and_a_second_turn(url: str) -> None:
    first = httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=120, json={
        "messages": [{"role": "user", "content": "a picture"}], "max_tokens": 20, "require_modalities": ["image"],
        "decoder": {"steps": 2}})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["artifacts"][0]["state"] == "completed" and body["finish_reason"] in ("stop", "length")
    # The next turn feeds the generated picture back through the encoder, as the reference does.
    second = httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=120, json={
        "conversation_id": body["conversation_id"], "messages": [{"role": "user", "content": "again"}],
        "max_tokens": 5})
    assert second.status_code == 200 and second.json()["conversation_id"] == body["conversation_id"]
    other = httpx.post(f"{url}/v1/chat", headers=_auth("other-key"), json={
        "conversation_id": body["conversation_id"], "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert other.status_code == 404  # another caller cannot read it


def test_a_long_conversation_goes_on_without_its_oldest_exchanges(url: str) -> None:
    """The gateway keeps the conversation; once it and the reply's budget outgrow the model's context, its oldest
    exchanges leave the prompt (before: every later turn was refused, prompt_too_long on 'turns' it never sent)."""
    conversation, prompts = None, []
    for i in range(10):
        body: dict[str, object] = {"messages": [{"role": "user", "content": f"turn {i} " + "word " * 300}],
                                   "max_tokens": 8, "allowed_modalities": []}
        if conversation:
            body["conversation_id"] = conversation
        response = httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=120, json=body)
        assert response.status_code == 200, (i, response.text)
        conversation = response.json()["conversation_id"]
        prompts.append(response.json()["usage"]["prompt_tokens"])
    # The whole conversation would be ~10 x the first turn's prompt; each prompt fits with the reply's budget.
    assert max(prompts) <= 2048 - 8 < 2048 < len(prompts) * prompts[0], prompts
    # A caller's own history gets no such help: too long for the context with its budget is a clear 400.
    mine = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 200} for i in range(3)]
    response = httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=120, json={"messages": mine, "max_tokens": 400})
    assert response.status_code == 400 and response.json()["error"]["code"] == "prompt_too_long"
    assert "context of 2048 tokens" in response.json()["error"]["message"]
    # Named as this API names it (the LLM service calls the conversation 'turns').
    response = httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=120,
                          json={"messages": [{"role": "user", "content": "word " * 1000}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages", response.text


def test_a_conversation_goes_on_past_the_llms_bound_on_media(url: str) -> None:
    """Every picture made joins the conversation as an input medium; past the LLM's 16 media per request the
    oldest exchanges leave the prompt (before: the 17th picture's turn and every one after got 413
    too_many_media)."""
    conversation = None
    for i in range(18):
        body: dict[str, object] = {"messages": [{"role": "user", "content": f"draw {i}"}], "max_tokens": 12,
                                   "require_modalities": ["image"], "decoder": {"steps": 1, "height": 32, "width": 32}}
        if conversation:
            body["conversation_id"] = conversation
        response = httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=120, json=body)
        assert response.status_code == 200, (i, response.text)
        assert [a["state"] for a in response.json()["artifacts"]] == ["completed"], (i, response.json())
        conversation = response.json()["conversation_id"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"messages": [{"role": "user", "content": "x", "files": ["nope.png"]}]}}, 400, "missing_file"),
        ({"json": {"messages": []}}, 400, "invalid_request"),
        ({"json": {"messages": [{"role": "user", "content": "x"}], "temperature": -1}}, 400, "invalid_request"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 400, "unsupported_content_type"),
        ({"data": {"request": json.dumps({"messages": [{"role": "user", "content": "x"}]})},
          "files": [("files", ("x.png", media.png(), "image/png"))]}, 400, "unused_file"),
        ({"data": {"request": json.dumps({"messages": [{"role": "user", "files": ["x.png"]}]})},
          "files": [("files", ("x.png", b"not an image at all", "image/png"))]}, 415, "unsupported_media"),
        ({"data": {"request": "{}"}, "files": [("files", ("big.png", b"0" * 3_100_000, "image/png"))]},
         413, "request_too_large"),
        # More uploads than gateway.max_files (4 here), and form fields that are not the API's.
        ({"data": {"request": json.dumps({"messages": [{"role": "user", "files": [f"{i}.png" for i in range(5)]}]})},
          "files": [("files", (f"{i}.png", media.png(), "image/png")) for i in range(5)]}, 400, "too_many_files"),
        ({"data": {"request": "{}", **{f"f{i}": "x" for i in range(5)}},
          "files": [("files", ("x.png", media.png(), "image/png"))]}, 400, "invalid_multipart"),
        # A misnamed part ('file' for 'files') is named, not dropped; so is a second request.
        ({"data": {"request": json.dumps({"messages": [{"role": "user", "content": "x"}]})},
          "files": [("file", ("x.png", media.png(), "image/png"))]}, 400, "invalid_multipart"),
        ({"data": {"request": [json.dumps({"messages": [{"role": "user", "files": ["x.png"]}]}), "{}"]},
          "files": [("files", ("x.png", media.png(), "image/png"))]}, 400, "invalid_multipart"),
        ({"json": {"messages": [{"role": "user", "content": "x"}], "conversation_id": "0" * 32}}, 404, "conversation_not_found"),
        # A sound shorter than the decoder can make is refused before the reply, not failed after it.
        ({"json": {"messages": [{"role": "user", "content": "x"}], "decoder": {"seconds": 0.01}}}, 400, "invalid_request"),
        # The required groups must fit the budget (refused before any work, streamed or not).
        ({"json": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10, "require_modalities": ["video"]}}, 400,
         "max_tokens_too_small"),
        ({"json": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 24, "stream": True,
                   "require_modalities": ["image", "video", "audio"]}}, 400, "max_tokens_too_small"),
    ],
)
def test_bad_requests_get_the_error_shape(url: str, kwargs: dict[str, object], status: int, code: str) -> None:
    response = httpx.post(f"{url}/v1/chat", headers={**_auth(), **kwargs.pop("headers", {})}, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_auth(url: str) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert httpx.post(f"{url}/v1/chat", json=body).json()["error"]["code"] == "missing_api_key"
    assert httpx.post(f"{url}/v1/chat", json=body, headers=_auth("wrong")).status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_artifact_urls_are_signed_and_support_ranges(url: str) -> None:
    body = httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=120, json={
        "messages": [{"role": "user", "content": "a picture"}], "max_tokens": 10, "require_modalities": ["image"],
        "decoder": {"steps": 2}}).json()
    link = body["artifacts"][0]["url"]
    whole = httpx.get(link)
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    part = httpx.get(link, headers={"range": "bytes=4-11"})
    assert part.status_code == 206 and part.content == whole.content[4:12]
    assert part.headers["content-range"] == f"bytes 4-11/{len(whole.content)}"
    assert httpx.get(link, headers={"range": "bytes=999999-"}).status_code == 416
    several = httpx.get(link, headers={"range": "bytes=0-1,4-5"})  # not served as ranges: the whole artifact
    assert several.status_code == 200 and several.content == whole.content
    assert httpx.get(link.split("?")[0]).status_code == 403
    forged = link.replace("expires=", "expires=9")
    assert httpx.get(forged).json()["error"]["code"] == "bad_signature"
    job = httpx.get(f"{url}/v1/jobs/{body['artifacts'][0]['job_id']}", headers=_auth()).json()
    assert job["state"] == "completed" and httpx.get(job["url"]).content == whole.content
    assert "owner" not in job
    # Another caller cannot see the job (nor learn its artifact's URL).
    stranger = httpx.get(f"{url}/v1/jobs/{body['artifacts'][0]['job_id']}", headers=_auth("other-key"))
    assert stranger.status_code == 404 and stranger.json()["error"]["code"] == "job_not_found"


def test_disconnect_cancels_generation_and_jobs(url: str) -> None:
    request = {"messages": [{"role": "user", "content": "a long video"}], "stream": True, "max_tokens": 40,
               "require_modalities": ["video"], "decoder": {"steps": 200}}
    with httpx.stream("POST", f"{url}/v1/chat", json=request, headers=_auth(), timeout=120) as response:
        job_id = first_job_id(response)
    assert job_id is not None
    assert wait_for_job_state(url, job_id, _auth(), "cancelled", timeout=30) == "cancelled"


def test_reconnect_with_last_event_id_resumes_the_stream(url: str) -> None:
    request = {"messages": [{"role": "user", "content": "a video"}], "stream": True, "max_tokens": 30, "seed": 3,
               "require_modalities": ["video"], "decoder": {"steps": 12}}
    with httpx.stream("POST", f"{url}/v1/chat", json=request, headers=_auth(), timeout=120) as response:
        stream_id = response.headers["x-stream-id"]
        job_id, last_id = read_until_job(response)
    assert job_id is not None and last_id > 0  # the connection dropped here
    resume = f"{url}/v1/chat/streams/{stream_id}"
    with httpx.stream("GET", resume, headers={**_auth(), "last-event-id": str(last_id)}, timeout=120) as response:
        assert response.status_code == 200 and response.headers["x-stream-id"] == stream_id
        rest = read_events(response, after=last_id)  # ids go on from the last one seen
    names = [n for n, _ in rest]
    assert names[-1] == "done" and "artifact.completed" in names
    assert [d["job_id"] for n, d in rest if n == "artifact.completed"] == [job_id]  # the job was not cancelled
    # The finished stream replays from any point in the window, to its owner only.
    with httpx.stream("GET", f"{resume}?after={last_id + len(rest) - 1}", headers=_auth(), timeout=30) as response:
        assert [n for n, _ in read_events(response, after=last_id + len(rest) - 1)] == ["done"]
    # An EventSource opened on ?after=N reconnects to that URL with the last id it saw: nothing twice.
    with httpx.stream("GET", f"{resume}?after={last_id}", timeout=30,
                      headers={**_auth(), "last-event-id": str(last_id + len(rest) - 1)}) as response:
        assert [n for n, _ in read_events(response, after=last_id + len(rest) - 1)] == ["done"]
    assert httpx.get(resume, headers=_auth("other-key")).json()["error"]["code"] == "stream_not_found"
    for garbage in ("x1", "²", "-3", "9" * 40):
        bad = httpx.get(resume, headers={**_auth(), "last-event-id": garbage.encode("latin-1")})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID", garbage
    assert httpx.get(f"{resume}?after=-1", headers=_auth()).status_code == 400
    past_the_end = httpx.get(f"{resume}?after={last_id + len(rest) + 5}", headers=_auth())
    assert past_the_end.status_code == 400 and past_the_end.json()["error"]["param"] == "query.after"


def test_media_inline_as_base64_when_asked(url: str) -> None:
    body = httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=120, json={
        "messages": [{"role": "user", "content": "a sound"}], "max_tokens": 20, "require_modalities": ["audio"],
        "decoder": {"steps": 2}, "inline_media": True}).json()
    artifact = body["artifacts"][0]
    data = base64.b64decode(artifact["data"])
    assert len(data) == artifact["bytes"] and data == httpx.get(artifact["url"]).content
    assert soundfile.read(io.BytesIO(data))[1] == 16000
    plain = httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=120, json={
        "messages": [{"role": "user", "content": "a sound"}], "max_tokens": 20, "require_modalities": ["audio"],
        "decoder": {"steps": 2}}).json()
    assert plain["artifacts"][0]["data"] is None
    with httpx.stream("POST", f"{url}/v1/chat", headers=_auth(), timeout=120, json={
            "messages": [{"role": "user", "content": "a picture"}], "max_tokens": 20, "stream": True,
            "require_modalities": ["image"], "decoder": {"steps": 2}, "inline_media": True}) as response:
        events = read_events(response)
    completed = next(d for n, d in events if n == "artifact.completed")
    assert Image.open(io.BytesIO(base64.b64decode(str(completed["data"])))).format == "PNG"
    assert "data" not in events[-1][1]["artifacts"][0]  # sent once, not again in done


def test_gateway_metrics_count_requests_by_route_and_media_by_outcome(url: str) -> None:
    httpx.get(f"{url}/v1/jobs/{'0' * 32}", headers=_auth())
    text = httpx.get(f"{url}/metrics").text
    samples = metric_samples(text)
    assert samples['nextgpt_gateway_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"}'] >= 1
    assert samples['nextgpt_gateway_requests_total{method="POST",route="/v1/chat",status="200"}'] >= 3
    assert samples["nextgpt_gateway_ttft_seconds_count"] >= 3
    assert samples['nextgpt_gateway_artifacts_total{modality="audio",state="completed"}'] >= 1
    assert samples["nextgpt_gateway_streams_active"] == 0
    # Raw paths never become labels (artifact keys would grow the series without bound).
    assert "/v1/artifacts/image" not in text


def test_a_conversation_must_end_with_the_user(url: str) -> None:
    response = httpx.post(f"{url}/v1/chat", headers=_auth(), json={
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_system_messages_open_a_conversation_as_the_openai_apis_do(url: str) -> None:
    """A system message joins the first turn's words, as the OpenAI-compatible API folds it: the same prompt and,
    greedy, the same reply. A kept conversation's later request cannot add one, and one after another message or
    with files is refused."""
    system = {"role": "system", "content": "answer in one short sentence"}

    def native(*first: dict[str, object], **extra: object) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=60, json={
            "messages": [*first, {"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0,
            "allowed_modalities": [], **extra})

    alone, told = native().json(), native(system).json()
    assert told["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"]
    folded = httpx.post(f"{url}/v1/chat/completions", headers=_auth(), timeout=60, json={
        "model": "nextgpt-tiny", "messages": [system, {"role": "user", "content": "hello"}], "max_tokens": 6,
        "temperature": 0, "modalities": ["text"]}).json()
    assert folded["usage"]["prompt_tokens"] == told["usage"]["prompt_tokens"]
    assert folded["choices"][0]["message"]["content"] == told["text"]
    later = native(system, conversation_id=told["conversation_id"])
    assert later.status_code == 400 and later.json()["error"]["code"] == "system_after_start", later.text
    assert native(conversation_id=told["conversation_id"]).status_code == 200  # the conversation goes on
    for messages, param, words in [
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, system], "messages",
         "the last message"),
        ([{"role": "user", "content": "hi"}, system, {"role": "user", "content": "hello"}], "messages",
         "before every other"),
        ([{**system, "files": ["a.png"]}, {"role": "user", "content": "hello"}], "messages.0", "text only"),
    ]:
        refused = httpx.post(f"{url}/v1/chat", headers=_auth(), json={"messages": messages})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == param and words in refused.json()["error"]["message"]


def test_a_user_message_with_nothing_in_it_is_refused(url: str) -> None:
    response = httpx.post(f"{url}/v1/chat", headers=_auth(), json={
        "messages": [{"role": "user", "content": "draw"}, {"role": "assistant", "content": "done"},
                     {"role": "user", "content": " \n"}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages.2" and "text or files" in error["message"]


def test_a_required_modality_left_out_of_the_allowed_ones_names_the_field(url: str) -> None:
    response = httpx.post(f"{url}/v1/chat", headers=_auth(), json={
        "messages": [{"role": "user", "content": "draw"}], "allowed_modalities": ["audio"],
        "require_modalities": ["image", "audio"]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "require_modalities"
    assert error["message"] == "require_modalities: ['image'] required but not in allowed_modalities"


@pytest.mark.parametrize("decoder", [
    {"height": 2048, "width": 2048, "frames": 128},
    # The width left to the bundle's default (the probe that got the process OOM-killed: 23 GB resident).
    {"height": 2048, "frames": 128, "steps": 1},
    {"width": 2048, "height": 2048},  # no frames: a picture of 4 M pixels is over budget too
])
def test_an_oversized_decode_is_refused_up_front(url: str, decoder: dict[str, int]) -> None:
    response = httpx.post(f"{url}/v1/chat", headers=_auth(), json={
        "messages": [{"role": "user", "content": "draw"}], "max_tokens": 40, "decoder": decoder})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "decode_too_large" and response.json()["error"]["param"] == "decoder"
    # The same sizes are fine when the reply may not make the modalities they are too large for.
    ok = httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=60, json={
        "messages": [{"role": "user", "content": "draw"}], "max_tokens": 4, "decoder": decoder,
        "allowed_modalities": ["audio"]})
    assert ok.status_code == 200, ok.text


def test_a_seeded_turn_is_reproducible_media_included(url: str) -> None:
    def turn(seed: int, decoder_seed: int | None = None) -> tuple[str, bytes]:
        decoder: dict[str, object] = {"steps": 2} | ({"seed": decoder_seed} if decoder_seed is not None else {})
        body = httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=120, json={
            "messages": [{"role": "user", "content": "a picture"}], "max_tokens": 12, "seed": seed,
            "require_modalities": ["image"], "decoder": decoder, "inline_media": True}).json()
        return body["text"], base64.b64decode(body["artifacts"][0]["data"])

    first = turn(7)
    assert turn(7) == first  # same words, same pixels: the decoder's noise follows the turn's seed
    assert turn(8)[1] != first[1]
    assert turn(7, decoder_seed=123)[1] != first[1]  # an explicit decoder seed still wins


def test_a_turn_whose_media_outlast_the_wait_is_saved_and_its_media_join_later(
        tiny_bundle_dir: Path, tmp_path: Path) -> None:
    import asyncio

    app = embedded_app(engines_here(Settings(cache_dir=tmp_path, api_keys=KEY)), load_bundle(tiny_bundle_dir))
    with UvicornThread(app) as server:
        state = app.state.gateway
        owner = state.keys.owner(f"Bearer {KEY}")

        def stored() -> list:  # the conversation as the gateway keeps it
            found = asyncio.run(state.chat.conversations.load(first["conversation_id"], owner))
            assert found is not None
            return found.turns

        first = httpx.post(f"{server.url}/v1/chat", headers=_auth(), timeout=120, json={
            "messages": [{"role": "user", "content": "a picture"}], "max_tokens": 12,
            "require_modalities": ["image"], "decoder": {"steps": 80}, "wait_s": 0}).json()
        assert first["finish_reason"] == "media_pending" and first["usage"]["completion_tokens"] > 0
        timings = first["timings"]  # the text's, as a complete answer has them
        assert 0 < timings["llm_ttft_ms"] and 0 < timings["ttft_ms"] <= timings["text_ms"]
        job_id = first["artifacts"][0]["job_id"]
        reply = stored()[1]
        assert reply.role == "assistant" and reply.text == first["text"] and reply.pending_jobs == [job_id]
        # Continued at once: the conversation exists; this turn sees the reply without its picture.
        follow = httpx.post(f"{server.url}/v1/chat", headers=_auth(), timeout=120, json={
            "conversation_id": first["conversation_id"], "messages": [{"role": "user", "content": "and now?"}],
            "max_tokens": 3})
        assert follow.status_code == 200, follow.text
        assert wait_for_job_state(server.url, job_id, _auth(), "completed", timeout=120) == "completed"
        # A later turn finds the job completed: the picture joins the reply it belongs to, encoded once.
        later = httpx.post(f"{server.url}/v1/chat", headers=_auth(), timeout=120, json={
            "conversation_id": first["conversation_id"], "messages": [{"role": "user", "content": "and now?"}],
            "max_tokens": 3})
        assert later.status_code == 200, later.text
        reply = stored()[1]
        assert reply.pending_jobs == [] and len(reply.vectors) == 1 and reply.artifact_keys == []


def test_downloads_can_redirect_to_the_object_store(tiny_bundle_dir: Path, tmp_path: Path, s3_info) -> None:  # noqa: ANN001
    import uuid

    storage = {"backend": "s3", "s3_endpoint_url": s3_info.endpoint_url, "s3_bucket": f"r-{uuid.uuid4().hex[:12]}",
               "s3_access_key_id": s3_info.access_key, "s3_secret_access_key": s3_info.secret_key,
               "s3_create_bucket": True, "redirect_downloads": True, "presign_ttl_s": 600}
    app = embedded_app(engines_here(Settings(cache_dir=tmp_path, api_keys=KEY, storage=storage)),
                       load_bundle(tiny_bundle_dir))
    with UvicornThread(app) as server:
        body = httpx.post(f"{server.url}/v1/chat", headers=_auth(), timeout=120, json={
            "messages": [{"role": "user", "content": "a picture"}], "max_tokens": 12, "require_modalities": ["image"],
            "decoder": {"steps": 2}, "inline_media": True}).json()
        artifact = body["artifacts"][0]
        redirect = httpx.get(artifact["url"], follow_redirects=False)
        assert redirect.status_code == 307 and redirect.headers["location"].startswith(s3_info.endpoint_url)
        stored = httpx.get(redirect.headers["location"])  # the store itself, no gateway in between
        assert stored.status_code == 200 and stored.content == base64.b64decode(artifact["data"])
        ranged = httpx.get(redirect.headers["location"], headers={"range": "bytes=0-3"})
        assert ranged.status_code == 206 and ranged.content == b"\x89PNG"
        # The gateway still checks the signature first: a bad one never reaches the store.
        assert httpx.get(artifact["url"].replace("sig=", "sig=0"), follow_redirects=False).status_code in (401, 403)


def test_a_huge_conversation_is_refused_before_it_is_tokenised(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    import resource
    import time

    app = embedded_app(engines_here(Settings(cache_dir=tmp_path, api_keys=KEY)), load_bundle(tiny_bundle_dir))
    # (the default 64 MB bodies)

    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 10_000} for i in range(255)]
    messages.append({"role": "user", "content": "x" * 50_000})  # 25.6 MB of text, inside the per-field limits
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with UvicornThread(app) as server:
        started = time.monotonic()
        response = httpx.post(f"{server.url}/v1/chat", headers=_auth(), timeout=120, json={"messages": messages})
        elapsed = time.monotonic() - started
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert response.status_code == 400 and response.json()["error"]["code"] == "prompt_too_long"
    # Before: 14 GB resident and no answer within 60 s (everything tokenised and embedded first).
    print(f"refused in {elapsed:.2f} s, peak RSS +{grown / 2**20:.0f} MiB")
    assert elapsed < 10 and grown < 1.5 * 2**30, (elapsed, grown / 2**20)


def test_a_streamed_turn_refused_before_its_first_token_gets_the_status(url: str) -> None:
    """Refusals the LLM finds (here: the prompt and max_tokens over the context) are the response's status, as
    for a non-streamed turn: before, the stream was answered 200 and carried an error event."""
    body = {"messages": [{"role": "user", "content": "word " * 1500}], "max_tokens": 1000, "stream": True}
    response = httpx.post(f"{url}/v1/chat", headers=_auth(), json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "prompt_too_long"
    openai_body = {"model": "nextgpt-tiny", "messages": body["messages"], "max_tokens": 1000, "stream": True}
    response = httpx.post(f"{url}/v1/chat/completions", headers=_auth(), json=openai_body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "prompt_too_long"


def test_a_full_server_answers_503_with_retry_after_streamed_or_not(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    """Two generations at most (one decoding, one waiting): of eight streamed turns sent at once, those beyond are
    503 with Retry-After (before: 200 streams carrying an 'overloaded' error event, which neither a client's retry
    nor a load balancer can see); the others stream to the end."""
    settings = engines_here(Settings(cache_dir=tmp_path, api_keys=KEY, llm={"max_batch": 1, "max_waiting": 1}))
    body = {"messages": [{"role": "user", "content": "say a lot"}], "max_tokens": 300, "stream": True}

    async def turn(client: httpx.AsyncClient) -> tuple[int, str | None, str]:
        async with client.stream("POST", "/v1/chat", json=body, headers=_auth()) as response:
            text = (await response.aread()).decode()
            return response.status_code, response.headers.get("retry-after"), text

    async def at_once(base: str) -> list[tuple[int, str | None, str]]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            return await asyncio.gather(*(turn(client) for _ in range(8)))

    with UvicornThread(embedded_app(settings, load_bundle(tiny_bundle_dir))) as server:
        results = asyncio.run(at_once(server.url))
        refused = [r for r in results if r[0] == 503]
        served = [r for r in results if r[0] == 200]
        assert refused and served and len(refused) + len(served) == 8, [r[:2] for r in results]
        assert all(retry == "1" and '"overloaded"' in text for _, retry, text in refused)
        assert all("event: done" in text and "event: error" not in text for _, _, text in served)


def test_a_caller_over_its_rate_gets_429_saying_how_long_to_wait(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    """One request a minute: the second, at once, is refused with the bucket's wait (a whole minute less the moment
    since the first) as Retry-After, which clients such as the OpenAI SDK honour."""
    settings = engines_here(Settings(cache_dir=tmp_path, api_keys=KEY, gateway={"rate_limit_per_minute": 1}))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with UvicornThread(embedded_app(settings, load_bundle(tiny_bundle_dir))) as server:
        assert httpx.post(f"{server.url}/v1/chat", headers=_auth(), json=body, timeout=60).status_code == 200
        refused = httpx.post(f"{server.url}/v1/chat", headers=_auth(), json={**body, "stream": True}, timeout=60)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    assert 55 <= int(refused.headers["retry-after"]) <= 60


def test_an_item_the_full_decoder_queue_refuses_fails_alone(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    """One decode job at most in the pool, and a turn that must make three: the first (a slow decode) is made, the
    two the queue cannot take fail on their own, saying why; the words, the turn and the conversation go on
    (before: the whole turn ended in a 503 'overloaded', its text and its first picture thrown away)."""
    settings = engines_here(Settings(cache_dir=tmp_path, api_keys=KEY, decoders={"max_queued": 1}))
    body = {"messages": [{"role": "user", "content": "make all three"}], "max_tokens": 60, "seed": 4,
            "require_modalities": ["image", "video", "audio"], "decoder": {"steps": 40}}
    with UvicornThread(embedded_app(settings, load_bundle(tiny_bundle_dir))) as server:
        reply = httpx.post(f"{server.url}/v1/chat", json=body, headers=_auth(), timeout=300)
        assert reply.status_code == 200, reply.text
        states = sorted((a["state"], (a["error"] or "").split(":")[0]) for a in reply.json()["artifacts"])
        assert states == [("completed", ""), ("failed", "overloaded"), ("failed", "overloaded")], states
        for artifact in reply.json()["artifacts"]:  # each item's job id says what became of it, refused ones too
            job = httpx.get(f"{server.url}/v1/jobs/{artifact['job_id']}", headers=_auth())
            assert job.status_code == 200 and (job.json()["state"], job.json()["error"]) == \
                (artifact["state"], artifact["error"]), job.text
        follow = httpx.post(f"{server.url}/v1/chat", headers=_auth(), timeout=300, json={
            "messages": [{"role": "user", "content": "again"}], "max_tokens": 4, "allowed_modalities": [],
            "conversation_id": reply.json()["conversation_id"]})
        assert follow.status_code == 200 and follow.json()["usage"]["prompt_tokens"] > \
            reply.json()["usage"]["prompt_tokens"]
        with httpx.stream("POST", f"{server.url}/v1/chat", json={**body, "stream": True}, headers=_auth(),
                          timeout=300) as response:
            events = read_events(response)
        names = [n for n, _ in events]
        assert names[-1] == "done" and "error" not in names
        assert sorted(d["error"].split(":")[0] for n, d in events if n == "artifact.failed") == ["overloaded"] * 2
        assert names.count("artifact.queued") == 1 and names.count("artifact.completed") == 1


def test_a_stream_cancelled_by_its_client_stops_its_generation_at_once(url: str) -> None:
    """POST .../cancel while the reply is being written (its reader attached, so the resume grace would keep it
    going): the generation stops, the stream ends with stream_cancelled; another key cannot cancel it."""
    def stopped() -> float:
        return metric(url, 'nextgpt_llm_requests_total{outcome="disconnected"}')

    before = stopped()
    body = {"messages": [{"role": "user", "content": "say a lot"}], "stream": True, "max_tokens": 400, "seed": 2,
            "allowed_modalities": []}
    events: list[tuple[str, dict]] = []
    with httpx.stream("POST", f"{url}/v1/chat", json=body, headers=_auth(), timeout=120) as response:
        stream_id, name, lines = response.headers["x-stream-id"], "", response.iter_lines()
        for line in lines:
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name == "message.delta" and len(events) == 3:
                    other = httpx.post(f"{url}/v1/chat/streams/{stream_id}/cancel", headers=_auth("other-key"))
                    assert other.status_code == 404
                    cancel = httpx.post(f"{url}/v1/chat/streams/{stream_id}/cancel", headers=_auth())
                    assert cancel.status_code == 200 and cancel.json() == {"stream_id": stream_id, "cancelled": True}
    assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "stream_cancelled"
    assert "done" not in [n for n, _ in events] and stopped() == before + 1
    again = httpx.post(f"{url}/v1/chat/streams/{stream_id}/cancel", headers=_auth())
    assert again.status_code == 200 and again.json()["cancelled"] is False


def test_a_client_gone_before_its_json_answer_stops_the_turn(url: str) -> None:
    """A non-streamed turn whose client goes away (a timeout; the OpenAI SDK then retries) stops: its generation,
    and its decode jobs, whose ids no one received. Before, both ran to their end for nobody, on both endpoints."""
    stopped = 'nextgpt_llm_requests_total{outcome="disconnected"}'
    cancelled = 'nextgpt_decoder_jobs_total{modality="video",outcome="cancelled"}'
    talk = {"messages": [{"role": "user", "content": "say a lot"}], "max_tokens": 400, "seed": 2,
            "allowed_modalities": []}
    for path, body in (("/v1/chat", talk), ("/v1/chat/completions", {**talk, "model": "nextgpt"})):
        before = metric(url, stopped)
        raw = json.dumps(body).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:  # closed while the reply is being written
            sock.sendall(f"POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {KEY}\r\n"
                         f"content-type: application/json\r\ncontent-length: {len(raw)}\r\n\r\n".encode() + raw)
            wait_until(lambda: metric(url, "nextgpt_llm_running") >= 1, 30, "the generation under way")
        wait_until(lambda: metric(url, stopped) == before + 1, 10, f"{path}: the generation stopped")

    before = metric(url, cancelled)
    with pytest.raises(httpx.ReadTimeout):  # the words are done; a slow clip is being drawn
        httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=httpx.Timeout(60, read=2.0), json={
            "messages": [{"role": "user", "content": "a long video"}], "max_tokens": 40,
            "require_modalities": ["video"], "decoder": {"steps": 200}, "wait_s": 120})
    wait_until(lambda: metric(url, cancelled) == before + 1, 30, "the clip's job cancelled")


def test_media_the_server_made_come_back_by_url(url: str, cache_dir: Path) -> None:
    """``artifacts`` of /v1/chat: a user's are the question's subject (all of them; one that is gone is a 404
    naming it), an assistant's history keeps those still stored."""
    def picture(seed: int) -> str:
        body = httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=120, json={
            "messages": [{"role": "user", "content": "draw"}], "max_tokens": 30, "seed": seed,
            "require_modalities": ["image"], "decoder": {"steps": 2}, "wait_s": 60}).json()
        return str(body["artifacts"][0]["url"])

    def prompt_tokens(*messages: dict[str, object]) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=60, json={
            "messages": [*messages, {"role": "user", "content": "what is it?"}], "max_tokens": 1})

    def answer(*urls: str) -> dict[str, object]:
        return {"role": "assistant", "content": "here", "artifacts": list(urls)}

    ask = {"role": "user", "content": "draw"}
    first, second = picture(1), picture(2)
    counts = [prompt_tokens(ask, answer(*urls)).json()["usage"]["prompt_tokens"]
              for urls in ((), (first,), (first, second))]
    assert counts[0] < counts[1] < counts[2]
    asked = prompt_tokens({"role": "user", "content": "compare", "artifacts": [first, second]}, answer())
    assert asked.status_code == 200 and asked.json()["usage"]["prompt_tokens"] > counts[0]
    for stored in cache_dir.rglob(second.split("?")[0].rsplit("/", 1)[-1]):
        stored.unlink()
    assert prompt_tokens(ask, answer(first, second)).json()["usage"]["prompt_tokens"] == counts[1]
    gone = prompt_tokens({"role": "user", "content": "compare", "artifacts": [first, second]}, answer())
    assert gone.status_code == 404
    assert (gone.json()["error"]["code"], gone.json()["error"]["param"]) == \
        ("artifact_not_found", "messages[0].artifacts[1]")
