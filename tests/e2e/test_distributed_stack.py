"""The distributed mode as users run it: gateway, encoder service, LLM service and a Celery worker as separate
processes on loopback, with Redis and an S3 server, on the tiny bundle."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import pytest
import soundfile
from PIL import Image

from tests.support import media
from tests.support.chat import first_job_id, read_events, read_until_job, wait_for_job_state
from tests.support.processes import ServiceProcess
from tests.support.servers import RedisInfo, S3Info
from tests.support.stack import KEY, distributed_stack


LEASE_S = 5
STOP_GRACE_S = 1


@pytest.fixture(scope="module")
def stack(redis_info: RedisInfo, s3_info: S3Info, tiny_bundle_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    extra = {
        # 50 concurrent streams below: more than the default bound on generations waiting (32, then 503).
        "NEXTGPT_LLM__MAX_WAITING": "64",
        "NEXTGPT_GATEWAY__RESUME_GRACE_S": "4",
        "NEXTGPT_GATEWAY__STREAM_LEASE_S": str(LEASE_S),
        "NEXTGPT_GATEWAY__SHUTDOWN_GRACE_S": str(STOP_GRACE_S),
    }
    with distributed_stack(redis_info.url, f"{redis_info.key_prefix}e2e:", s3_info, tiny_bundle_dir,
                           tmp_path_factory.mktemp("e2e-logs"), extra) as running:
        yield {"url": running.url, "url2": running.url2, "services": running.services, "logs": running.logs}


def _auth() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}


def test_upload_stream_and_download_every_modality(stack: dict[str, object]) -> None:
    url = str(stack["url"])
    assert httpx.get(f"{url}/readyz").json() == {"status": "ready"}
    request = {"messages": [{"role": "user", "content": "one of each", "files": ["a.png", "b.wav", "c.mp4"]}],
               "stream": True, "max_tokens": 60, "seed": 8, "require_modalities": ["image", "video", "audio"],
               "decoder": {"steps": 2}}
    files = [("files", ("a.png", media.png(), "image/png")), ("files", ("b.wav", media.wav(), "audio/wav")),
             ("files", ("c.mp4", media.mp4(), "video/mp4"))]
    with httpx.stream("POST", f"{url}/v1/chat", data={"request": json.dumps(request)}, files=files,
                      headers=_auth(), timeout=300) as response:
        assert response.status_code == 200
        events = read_events(response)
    names = [n for n, _ in events]
    (Path(str(stack["logs"])) / "events.json").write_text(json.dumps(events))
    assert names[-1] == "done" and "message.delta" in names
    completed = {str(d["modality"]): d for n, d in events if n == "artifact.completed"}
    assert sorted(completed) == ["audio", "image", "video"], [e for e in events if e[0] != "message.delta"]
    image = httpx.get(str(completed["image"]["url"])).content
    assert Image.open(io.BytesIO(image)).size == (64, 64)
    with av.open(io.BytesIO(httpx.get(str(completed["video"]["url"])).content)) as container:
        assert len(list(container.decode(container.streams.video[0]))) == 8
    samples, rate = soundfile.read(io.BytesIO(httpx.get(str(completed["audio"]["url"])).content))
    assert rate == 16000 and len(samples) == 16000
    # A second turn: the generated media go back through the encoder service, by object-store key.
    conversation = events[-1][1]["conversation_id"]
    second = httpx.post(f"{url}/v1/chat", headers=_auth(), timeout=120, json={
        "conversation_id": conversation, "messages": [{"role": "user", "content": "and now?"}], "max_tokens": 5})
    assert second.status_code == 200, second.text
    # A stateless client's history through the OpenAI endpoint, on the other replica: the picture by its URL
    # (signed by the first), the sound by its job id (the job book in Redis), both back through the encoder
    # service by key.
    def prompt_tokens(answer: dict[str, object]) -> int:
        reply = httpx.post(f"{stack['url2']}/v1/chat/completions", headers=_auth(), timeout=120, json={
            "model": "nextgpt", "max_tokens": 1,
            "messages": [{"role": "user", "content": "one of each"}, answer, {"role": "user", "content": "and?"}]})
        assert reply.status_code == 200, reply.text
        return int(reply.json()["usage"]["prompt_tokens"])

    words = {"role": "assistant", "content": "here"}
    alone = prompt_tokens(words)
    picture = {"type": "image_url", "image_url": {"url": completed["image"]["url"]}}
    assert prompt_tokens({**words, "images": [picture]}) > alone
    assert prompt_tokens({**words, "audio": {"id": completed["audio"]["job_id"]}}) > alone


def test_encoder_down_is_a_clear_503_and_recovers(stack: dict[str, object]) -> None:
    url = str(stack["url"])
    encoder: ServiceProcess = stack["services"]["encoder"]  # type: ignore[index]
    encoder.stop()
    try:
        request = {"messages": [{"role": "user", "content": "what is it", "files": ["a.png"]}], "max_tokens": 4}
        response = httpx.post(f"{url}/v1/chat", headers=_auth(), data={"request": json.dumps(request)},
                              files=[("files", ("a.png", media.png(), "image/png"))], timeout=60)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "encoder_unavailable"
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and "encoder" in ready.json()["error"]["message"]
    finally:
        encoder.start().wait_ready()
    response = httpx.post(f"{url}/v1/chat", headers=_auth(), data={"request": json.dumps(request)},
                          files=[("files", ("a.png", media.png(), "image/png"))], timeout=60)
    assert response.status_code == 200


def test_fifty_concurrent_streams_lose_and_cross_nothing(stack: dict[str, object]) -> None:
    import asyncio

    url = str(stack["url"])

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str, dict[str, object]]:
        body = {"messages": [{"role": "user", "content": f"client {i}"}], "stream": True, "max_tokens": 6,
                "seed": i}
        text, done = [], {}
        async with client.stream("POST", f"{url}/v1/chat", json=body, headers=_auth()) as response:
            assert response.status_code == 200
            name = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if name == "message.delta":
                        text.append(data["text"])
                    elif name in ("done", "error"):
                        done = data
        return i, "".join(text), done

    async def run() -> list[tuple[int, str, dict[str, object]]]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=50)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    results = asyncio.run(run())
    assert len(results) == 50
    errors = [done for _, _, done in results if "conversation_id" not in done]
    assert not errors, errors[:3]
    conversations = {str(done["conversation_id"]) for _, _, done in results}
    assert len(conversations) == 50  # every stream ended with its own done
    for _, text, done in results:
        assert done["text"] == text  # the deltas a client got are exactly its reply
        assert done["usage"]["completion_tokens"] <= 6  # type: ignore[index]


def test_disconnect_cancels_generation_and_jobs_across_services(stack: dict[str, object]) -> None:
    url = str(stack["url"])
    llm: ServiceProcess = stack["services"]["llm"]  # type: ignore[index]
    llm_metrics = llm.ready_url.replace("/readyz", "/metrics")
    request = {"messages": [{"role": "user", "content": "a long video"}], "stream": True, "max_tokens": 40,
               "require_modalities": ["video"], "decoder": {"steps": 200}}
    with httpx.stream("POST", f"{url}/v1/chat", json=request, headers=_auth(), timeout=120) as response:
        job_id = first_job_id(response)
    assert job_id is not None
    # The worker stops it between two steps.
    assert wait_for_job_state(url, job_id, _auth(), "cancelled") == "cancelled"
    running = [line for line in httpx.get(llm_metrics).text.splitlines() if line.startswith("nextgpt_llm_running ")]
    assert running == ["nextgpt_llm_running 0.0"]


def test_a_dropped_stream_resumes_on_another_replica_and_the_conversation_follows(stack: dict[str, object]) -> None:
    url, url2 = str(stack["url"]), str(stack["url2"])
    request = {"messages": [{"role": "user", "content": "a video please"}], "stream": True, "max_tokens": 30,
               "seed": 5, "require_modalities": ["video"], "decoder": {"steps": 10}}
    with httpx.stream("POST", f"{url}/v1/chat", json=request, headers=_auth(), timeout=120) as response:
        stream_id = response.headers["x-stream-id"]
        job_id, last_id = read_until_job(response)
    assert job_id is not None
    # The load balancer sends the reconnect to the other replica: the rest comes from Redis.
    with httpx.stream("GET", f"{url2}/v1/chat/streams/{stream_id}", timeout=120,
                      headers={**_auth(), "last-event-id": str(last_id)}) as response:
        assert response.status_code == 200
        rest = read_events(response, after=last_id)
    assert rest[-1][0] == "done"
    assert [d["job_id"] for n, d in rest if n == "artifact.completed"] == [job_id]
    conversation = rest[-1][1]["conversation_id"]
    # The history is in Redis too: the next turn works through the other replica, and only for its owner.
    second = httpx.post(f"{url2}/v1/chat", headers=_auth(), timeout=120, json={
        "conversation_id": conversation, "messages": [{"role": "user", "content": "shorter"}], "max_tokens": 5})
    assert second.status_code == 200 and second.json()["conversation_id"] == conversation


def test_a_stream_whose_replica_was_killed_ends_on_another_replica_within_the_lease(
        stack: dict[str, object]) -> None:
    """A replica killed mid-reply (the OOM killer, a lost node) writes no end to its streams. The client that
    reconnects through the other replica gets what was written, then an ``error`` event ``stream_gone`` once the
    dead replica's lease has lapsed (NEXTGPT_GATEWAY__STREAM_LEASE_S), where it waited REPLAY_TTL_S (300 s)."""
    services: dict[str, ServiceProcess] = stack["services"]  # type: ignore[assignment]
    url, url2 = str(stack["url"]), str(stack["url2"])
    request = {"messages": [{"role": "user", "content": "tell me a long story"}], "stream": True,
               "max_tokens": 1024, "seed": 3}
    try:
        with httpx.stream("POST", f"{url}/v1/chat", json=request, headers=_auth(), timeout=60) as response:
            assert response.status_code == 200, response.read()
            stream_id, last_id = response.headers["x-stream-id"], 0
            for line in response.iter_lines():
                if line.startswith("id: "):
                    last_id = int(line[4:])
                if last_id == 20:
                    break
            gateway = services["gateway"].proc
            assert gateway is not None
            os.killpg(gateway.pid, signal.SIGKILL)
            gateway.wait()
            killed = time.monotonic()
        with httpx.stream("GET", f"{url2}/v1/chat/streams/{stream_id}", timeout=60,
                          headers={**_auth(), "last-event-id": str(last_id)}) as response:
            assert response.status_code == 200
            rest = read_events(response, after=last_id)
        waited = time.monotonic() - killed
        assert rest[-1][0] == "error" and rest[-1][1]["error"]["code"] == "stream_gone", rest[-1]  # type: ignore[index]
        assert all(name == "message.delta" for name, _ in rest[:-1])
        assert waited < LEASE_S + 5, waited
    finally:
        services["gateway"].start().wait_ready()


def test_a_replica_stopped_mid_reply_ends_it_after_its_grace_for_its_readers_everywhere(
        stack: dict[str, object]) -> None:
    """A rollout's SIGTERM: the replica takes no new connection, lets the reply go on for its grace
    (NEXTGPT_GATEWAY__SHUTDOWN_GRACE_S), then ends it with ``error`` ``server_stopping`` (send it again) for its own
    client and for a client that follows the stream through the other replica, and exits. A reply whose text was
    kept, its video still being made, ends with ``done`` (``media_pending``), not "send it again" (which would add
    the turn twice): its job goes on on the workers and completes, seen through the other replica."""
    import threading

    services: dict[str, ServiceProcess] = stack["services"]  # type: ignore[assignment]
    url, url2 = str(stack["url"]), str(stack["url2"])
    request = {"messages": [{"role": "user", "content": "tell me a long story"}], "stream": True,
               "max_tokens": 1024, "seed": 4}
    elsewhere: list[tuple[str, dict[str, object]]] = []
    kept: list[tuple[str, dict[str, object]]] = []
    decoding = threading.Event()

    def make_a_video() -> None:
        video = {"messages": [{"role": "user", "content": "a video please"}], "stream": True, "max_tokens": 30,
                 "seed": 5, "require_modalities": ["video"], "decoder": {"steps": 12}}
        with httpx.stream("POST", f"{url}/v1/chat", json=video, headers=_auth(), timeout=60) as response:
            lines, last_id = response.iter_lines(), 0
            for line in lines:
                if line.startswith("id: "):
                    last_id = int(line[4:])
                elif line == "event: artifact.progress":  # the text is over: its turn is kept
                    next(lines)  # its data
                    decoding.set()
                    break
            kept.extend(read_events(lines, after=last_id))

    maker = threading.Thread(target=make_a_video, daemon=True)
    maker.start()
    assert decoding.wait(60), kept
    try:
        with httpx.stream("POST", f"{url}/v1/chat", json=request, headers=_auth(), timeout=60) as response:
            assert response.status_code == 200, response.read()
            stream_id, last_id, lines = response.headers["x-stream-id"], 0, response.iter_lines()
            for line in lines:
                if line.startswith("id: "):
                    last_id = int(line[4:])
                if last_id == 20:
                    break

            def follow() -> None:
                with httpx.stream("GET", f"{url2}/v1/chat/streams/{stream_id}", timeout=60,
                                  headers={**_auth(), "last-event-id": "0"}) as other:
                    elsewhere.extend(read_events(other))

            follower = threading.Thread(target=follow, daemon=True)
            follower.start()
            gateway = services["gateway"].proc
            assert gateway is not None
            os.killpg(gateway.pid, signal.SIGTERM)
            stopped = time.monotonic()
            rest = read_events(lines, after=last_id)
            took = time.monotonic() - stopped
        follower.join(30)
        maker.join(30)
        assert gateway.wait(30) == -signal.SIGTERM
        for events in (rest, elsewhere):
            assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "server_stopping", events[-2:]  # type: ignore[index]
            assert all(name == "message.delta" for name, _ in events[:-1])
        assert len(rest) > 1 and STOP_GRACE_S - 0.5 < took < STOP_GRACE_S + 5, (took, len(rest))
        name, done = kept[-1]
        assert name == "done" and done["finish_reason"] == "media_pending", kept[-2:]
        (video,) = done["artifacts"]  # type: ignore[misc]
        assert video["state"] in ("queued", "running"), video
        assert wait_for_job_state(url2, video["job_id"], _auth(), "completed") == "completed"
    finally:
        services["gateway"].start().wait_ready()


def test_every_service_keeps_an_idle_connection_longer_than_its_clients_pool_it(stack: dict[str, object]) -> None:
    """A connection idle for 6 s (past the 5 s after which uvicorn closed it, while the gateway's pools kept theirs
    5 s and 15 s, so a request could be sent on a connection being closed: a reset, and a 503 for the user) still
    serves its next request, on the gateway, the encoder and the LLM service."""
    services: dict[str, ServiceProcess] = stack["services"]  # type: ignore[assignment]
    targets = {name: services[name].ready_url.removeprefix("http://").split("/")[0]
               for name in ("gateway", "encoder", "llm")}

    def get(sock: socket.socket, host: str) -> bytes:
        """The response's head, its body read whole (the next response starts clean); b"" when closed."""
        sock.sendall(f"GET /healthz HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"content-length: (\d+)", data, re.I).group(1)):  # type: ignore[union-attr]
            chunk = sock.recv(4096)
            if not chunk:
                return b""  # closed by the server
            data += chunk
        return data.partition(b"\r\n\r\n")[0]

    sockets = {}
    try:
        for name, host in targets.items():
            address, port = host.split(":")
            sockets[name] = socket.create_connection((address, int(port)), timeout=10)
            assert get(sockets[name], host).startswith(b"HTTP/1.1 200"), name
        time.sleep(6)
        for name, host in targets.items():
            try:
                again = get(sockets[name], host)
            except (ConnectionResetError, BrokenPipeError):
                again = b""
            assert again.startswith(b"HTTP/1.1 200"), f"{name} closed an idle connection within 6 s"
    finally:
        for sock in sockets.values():
            sock.close()


def test_every_service_leaves_its_start_up_objects_out_of_the_collectors_scans(stack: dict[str, object]) -> None:
    """Each serving process, once loaded, freezes what it holds (``services.runtime.heap``): under load the
    gateway's full collections otherwise walked a couple of hundred thousand start-up objects every 9-20 s, a pause
    of about 100 ms for every stream in flight."""
    services: dict[str, ServiceProcess] = stack["services"]  # type: ignore[assignment]
    for name in ("gateway", "encoder", "llm"):
        base = services[name].ready_url.rsplit("/", 1)[0]
        text = httpx.get(f"{base}/metrics", timeout=10).text
        found = re.search(r"^nextgpt_gc_frozen_objects (\S+)$", text, re.M)
        assert found is not None, f"{name}: no nextgpt_gc_frozen_objects"
        assert float(found.group(1)) > 10_000, f"{name}: {found.group(0)}"
