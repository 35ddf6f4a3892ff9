"""Redis restarted while a request is in flight: the gateway's stream log, the job events it follows and the
Celery worker all ride it out, and the client gets its whole answer."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import pytest

from tests.support.servers import RestartableRedis, S3Info
from tests.support.stack import Stack, distributed_stack


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RestartableRedis]:
    server = RestartableRedis().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def stack(redis_server: RestartableRedis, s3_info: S3Info, tiny_bundle_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with distributed_stack(redis_server.url, "nextgpt-restart:", s3_info, tiny_bundle_dir,
                           tmp_path_factory.mktemp("restart-logs"), {"NEXTGPT_GATEWAY__HEARTBEAT_S": "2"}) as running:
        yield running


def test_a_request_survives_a_redis_restart(stack: Stack, redis_server: RestartableRedis) -> None:
    request = {"messages": [{"role": "user", "content": "a video"}], "stream": True, "max_tokens": 30, "seed": 2,
               "require_modalities": ["video"], "decoder": {"steps": 24}}
    events: list[tuple[str, dict[str, object]]] = []
    restarted, deadline = False, time.monotonic() + 150
    with httpx.stream("POST", f"{stack.url}/v1/chat", json=request, headers=stack.auth, timeout=180) as response:
        assert response.status_code == 200
        name = ""
        for line in response.iter_lines():  # heartbeats every 2 s: the deadline is checked even when stuck
            assert time.monotonic() < deadline, f"stuck after the restart: {[n for n, _ in events][-5:]}"
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name == "artifact.progress" and not restarted:
                    restarted = True  # mid-decode, mid-stream: down for two seconds, then back
                    redis_server.stop()
                    time.sleep(2.0)
                    redis_server.start()
    names = [n for n, _ in events]
    assert restarted and names[-1] == "done", [e for e in events if e[0] != "message.delta"][-5:]
    completed = [d for n, d in events if n == "artifact.completed"]
    assert len(completed) == 1 and "artifact.failed" not in names
    with av.open(io.BytesIO(httpx.get(str(completed[0]["url"]), timeout=30).content)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    # And the stack is healthy afterwards.
    assert httpx.get(f"{stack.url}/readyz", timeout=10).json() == {"status": "ready"}
    after = httpx.post(f"{stack.url}/v1/chat", headers=stack.auth, timeout=120, json={
        "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 5})
    assert after.status_code == 200, after.text
