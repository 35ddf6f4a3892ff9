"""The ``nextgpt`` console script as users run it: a separate process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tests.support.servers import RedisInfo, UvicornThread, free_port, wait_until

NEXTGPT = str(Path(sys.executable).parent / "nextgpt")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NEXTGPT, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_inspect_prints_the_summary(tiny_bundle_dir: Path) -> None:
    result = _run("bundle", "inspect", str(tiny_bundle_dir))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["name"] == "nextgpt-tiny"
    assert summary["outputs"]["audio"]["conditioning"] == [24]


def test_inspect_of_a_broken_bundle_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "bundle.json").write_text("{}")
    result = _run("bundle", "inspect", str(tmp_path))
    assert result.returncode == 2
    assert "bundle.json" in result.stderr and "schema_version" in result.stderr


def test_a_step_of_the_recipe_run_before_its_inputs_exist_says_what_is_missing(tmp_path: Path) -> None:
    """`world assemble` before `world pretrain`: the message says what to run first, at once (it came after 11 s
    of imports, below a traceback)."""
    started = time.monotonic()
    assembled = _run("world", "assemble", "--work", str(tmp_path), "--out", str(tmp_path / "bundle"))
    assert assembled.returncode == 2 and "nextgpt world pretrain" in assembled.stderr, assembled.stderr
    assert "Traceback" not in assembled.stderr and time.monotonic() - started < 5


def test_eval_against_a_stack_it_cannot_use_says_why() -> None:
    """`nextgpt eval world` against nothing, or against a server that refuses it: one line, exit 2."""
    app = FastAPI()

    @app.get("/v1/{rest:path}")
    @app.post("/v1/{rest:path}")
    def refuse(rest: str) -> JSONResponse:
        return JSONResponse({"error": {"code": "invalid_api_key"}}, status_code=401)

    nothing = _run("eval", "world", "--url", f"http://127.0.0.1:{free_port()}", "--count", "1")
    assert nothing.returncode == 2 and "cannot reach" in nothing.stderr and "Traceback" not in nothing.stderr
    with UvicornThread(app) as server:
        refused = _run("eval", "world", "--url", server.url, "--count", "1", "--modality", "image")
    assert refused.returncode == 2 and "answered 401" in refused.stderr and "invalid_api_key" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_bad_setting_stops_start_naming_the_variable(tiny_bundle_dir: Path) -> None:
    result = _run("serve", "--bundle", str(tiny_bundle_dir), env={"NEXTGPT_STORAGE__BACKEND": "s4"})
    assert result.returncode == 2
    assert "NEXTGPT_STORAGE__BACKEND" in result.stderr


def test_every_setting_error_is_one_line_naming_the_variable(tiny_bundle_dir: Path) -> None:
    cases = [
        ({"NEXTGPT_GATEWAY__TRUSTED_PROXIES": "[10.0.0.1"}, ("serve",), "NEXTGPT_GATEWAY__TRUSTED_PROXIES"),
        ({"NEXTGPT_ENCODER__DEVICE": "cuda"}, ("encoder", "serve", "--port", "1"), "NEXTGPT_ENCODER__DEVICE"),
        ({"NEXTGPT_LLM__DEVICE": "cuda:3"}, ("serve",), "NEXTGPT_LLM__DEVICE"),
    ]
    for env, args, variable in cases:
        result = _run(*args, "--bundle", str(tiny_bundle_dir), env=env)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and variable in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_a_taken_port_fails_before_any_model_loads(tiny_bundle_dir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("serve", "--bundle", str(tiny_bundle_dir), env={"NEXTGPT_PORT": str(port)})
    assert result.returncode == 2, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "NEXTGPT_PORT" in result.stderr
    assert "loaded" not in result.stderr and "Traceback" not in result.stderr


def test_list_settings_take_comma_separated_values() -> None:
    code = "from services.contracts.settings import load_settings; print(load_settings().gateway.trusted_proxies)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "NEXTGPT_GATEWAY__TRUSTED_PROXIES": "10.0.0.1, 10.0.0.2"})
    assert result.stdout.strip() == "['10.0.0.1', '10.0.0.2']", result.stderr


@pytest.mark.parametrize("command", [("bundle", "tiny"), ("bundle", "pack", "{missing}"),
                                     ("world", "assemble", "--work", "{missing}"),
                                     ("train", "instruct", "--bundle", "{missing}", "--data", "{world}")],
                         ids=lambda c: " ".join(c[:2]))
def test_a_folder_in_the_way_is_refused_before_any_work(tmp_path: Path, command: tuple[str, ...]) -> None:
    """An --out that holds something, without --force, is refused before anything is read: the inputs here do
    not exist, so a command that read them first would fail on them instead. (A training run was refused only when
    it came to write its bundle, after all its steps.)"""
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep")
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "world.json").write_text("{}")
    args = [a.format(missing=tmp_path / "missing", world=tmp_path / "world") for a in command]
    result = _run(*args, "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "exists and is not empty (use --force" in result.stderr, result.stderr
    assert (tmp_path / "x" / "file").read_text() == "keep"


def test_a_training_run_refuses_a_folder_in_the_way_before_its_bundle_loads(tmp_path: Path) -> None:
    """The same from Python (a notebook, accelerate launch of our runner)."""
    from services.training.runner import StageRun, train_stage

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep")
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "world.json").write_text("{}")
    with pytest.raises(FileExistsError, match="use --force"):
        train_stage(StageRun(stage="instruct", bundle=tmp_path / "missing", data=tmp_path / "world",
                             out=tmp_path / "x", work=tmp_path / "x.work"))


def _children(pid: int) -> list[str]:
    return subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()


# Library output with nothing in it for a server's operator: progress bars of loading weights, Python warnings,
# transformers' torchvision fallback, diffusers' deprecated pipelines.
LIBRARY_NOISE = ("Loading weights", "Loading pipeline components", "Warning: ", "requires torchvision",
                 "has been deprecated")


def test_serve_answers_health_and_models(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [NEXTGPT, "serve", "--bundle", str(tiny_bundle_dir), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NEXTGPT_CACHE_DIR": str(tmp_path / "cache"),
                                                       "NEXTGPT_GATEWAY__HEADER_TIMEOUT_S": "2",
                                                       "NEXTGPT_GATEWAY__BODY_TIMEOUT_S": "2"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base}/healthz").status_code == 200, 120, "nextgpt serve", proc, log)
        _hostile_heads_and_bodies(port)
        assert httpx.get(f"{base}/readyz").json() == {"status": "ready"}
        models = httpx.get(f"{base}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["nextgpt-tiny", "nextgpt"]
        missing = httpx.get(f"{base}/v1/nothing-here")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found_error"
        _clients_that_go_away(port)
        # Clients going away are normal: no traceback in the log, no false 500 in the metrics.
        wait_until(lambda: log.read_text().count("client closed the connection") >= 5, 30, "disconnects logged")
        metrics = httpx.get(f"{base}/metrics").text
        assert 'route="/v1/chat",status="500"' not in metrics
        assert 'nextgpt_gateway_requests_total{method="POST",route="/v1/chat",status="499"} 5.0' in metrics
        # Two model processes, the decoder pipelines and the LLM engine, forked by the server's one fork server.
        children = _children(proc.pid)
        servers = [c for c in children if "forkserver" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(servers) == 1, children
        models = _children(int(servers[0]))
        found = re.search(r"decoder process (\d+) ready", log.read_text())
        assert found is not None and found.group(1) in models and len(models) == 2, (models, children)
        # A decoder child that dies costs no more than the call it was in: the server serves on, and the next
        # job gets a new child.
        os.kill(int(found.group(1)), signal.SIGKILL)
        picture = httpx.post(f"{base}/v1/chat", timeout=120, json={
            "messages": [{"role": "user", "content": "a picture"}], "max_tokens": 12,
            "require_modalities": ["image"], "decoder": {"steps": 2}, "wait_s": 60}).json()
        assert [a["state"] for a in picture["artifacts"]] == ["completed"], picture
        assert "decoder process gone" in log.read_text()
        assert httpx.get(f"{base}/readyz").json() == {"status": "ready"}
        # Both children have loaded (the decoder's twice): what the libraries print on their own while loading is
        # not in the server's log (services/runtime/library_noise).
        noise = [line[:160] for line in log.read_text().splitlines() if any(w in line for w in LIBRARY_NOISE)]
        assert not noise, noise
        # The LLM engine's child; if it dies, the server stops so that its supervisor restarts it.
        engines = [c for c in models if c != found.group(1)]
        os.kill(int(engines[0]), signal.SIGKILL)
        proc.wait(60)
        assert "the LLM engine process died" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in log.read_text()


def test_a_stop_signal_to_the_process_group_lets_the_replies_under_way_finish(tiny_bundle_dir: Path,
                                                                              tmp_path: Path) -> None:
    """systemd stops a service with a SIGTERM to each of its processes (a terminal's Ctrl-C reaches the whole
    group too): the server shuts down gracefully, and the LLM engine, its child, must not end before the reply under
    way does (it did: the reply ended in an llm_engine_exited error and the log reported a crash)."""
    import threading

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([NEXTGPT, "serve", "--bundle", str(tiny_bundle_dir), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "NEXTGPT_CACHE_DIR": str(tmp_path / "cache")})
    base = f"http://127.0.0.1:{port}"
    events: list[str] = []
    streaming = threading.Event()

    def read() -> None:
        body = {"messages": [{"role": "user", "content": "hello"}], "stream": True, "max_tokens": 600,
                "allowed_modalities": [], "temperature": 1.0, "seed": 3}
        with httpx.stream("POST", f"{base}/v1/chat", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    streaming.set()

    try:
        wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, 120, "nextgpt serve", proc, log)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert streaming.wait(60), log.read_text()[-2000:]
        os.killpg(proc.pid, signal.SIGTERM)
        reader.join(120)
        assert proc.wait(60) == -signal.SIGTERM  # uvicorn ends by the signal it stopped for, once shut down
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert events[-1] == "done" and "error" not in events, events[-3:]
    assert events.count("message.delta") > 100  # the reply went on well past the signal
    text = log.read_text()
    assert "exited unexpectedly" not in text and "Traceback" not in text, text[-3000:]


def test_replies_that_outlast_the_stop_grace_end_with_a_word_to_their_clients(tiny_bundle_dir: Path,
                                                                               tmp_path: Path) -> None:
    """A stop waited without a bound for every reply under way (a long reply on a CPU held Ctrl-C; a rollout
    ended with the orchestrator's SIGKILL, the replies cut with no word). Past NEXTGPT_GATEWAY__SHUTDOWN_GRACE_S
    each kind of reply ends with ``server_stopping`` (send it again) and the server exits."""
    import threading

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([NEXTGPT, "serve", "--bundle", str(tiny_bundle_dir), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "NEXTGPT_CACHE_DIR": str(tmp_path / "cache"),
                                     "NEXTGPT_GATEWAY__SHUTDOWN_GRACE_S": "1"})
    base = f"http://127.0.0.1:{port}"
    long = {"max_tokens": 1024, "temperature": 1.0, "seed": 3}
    got: dict[str, object] = {}
    model: list[str] = []
    started = {name: threading.Event() for name in ("sse", "openai")}

    def stream(name: str, path: str, body: dict[str, object]) -> None:
        lines = []
        with httpx.stream("POST", f"{base}{path}", json=body | {"stream": True}, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    started[name].set()
        got[name] = lines

    def whole(body: dict[str, object]) -> None:
        response = httpx.post(f"{base}/v1/chat", json=body, timeout=60)
        got["whole"] = (response.status_code, response.json()["error"]["code"] if response.is_error else None)

    try:
        wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, 120, "nextgpt serve", proc, log)
        model.append(httpx.get(f"{base}/v1/models").json()["data"][0]["id"])
        hello = [{"role": "user", "content": "hello"}]
        readers = [threading.Thread(target=stream, args=("sse", "/v1/chat",
                                                         {"messages": hello, "allowed_modalities": [], **long}),
                                    daemon=True),
                   threading.Thread(target=stream, args=("openai", "/v1/chat/completions",
                                                         {"model": model[0], "messages": hello, **long}), daemon=True),
                   threading.Thread(target=whole, args=({"messages": hello, "allowed_modalities": [], **long},),
                                    daemon=True)]
        for reader in readers:
            reader.start()
        assert all(event.wait(60) for event in started.values()), log.read_text()[-2000:]
        time.sleep(0.3)  # the answer in one piece under way too
        stopped = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        for reader in readers:
            reader.join(30)
        assert proc.wait(30) == -signal.SIGTERM
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    text = log.read_text()
    sse = got["sse"]
    assert isinstance(sse, list) and sse[-2] == "event: error" and "event: done" not in sse, sse[-3:]
    assert json.loads(sse[-1].removeprefix("data: "))["error"]["code"] == "server_stopping"
    assert got["whole"] == (503, "server_stopping"), got["whole"]
    chunks = [line[6:] for line in got["openai"]]  # type: ignore[attr-defined]
    assert chunks[-1] == "[DONE]" and json.loads(chunks[-2])["error"]["code"] == "server_stopping", chunks[-3:]
    assert took < 8, took  # the grace (1 s), the replies' last events, the server's own stop
    assert "did not finish within 1 s" in text and "Traceback" not in text, text[-3000:]


def _exchange(port: int, chunks: list[bytes], pause_s: float = 0.0) -> bytes:
    import socket
    import time

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-way: the answer is still in the socket
        reply = b""
        while True:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            reply += part
    return reply


def _hostile_heads_and_bodies(port: int) -> None:
    """Heads and bodies the server bounds itself: size, lines, time (each answered in the shared error shape)."""
    import time

    start = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    huge = _exchange(port, [start + b"Authorization: Bearer " + b"k" * 200_000 + b"\r\n\r\n"])
    assert huge.startswith(b"HTTP/1.1 431") and b"headers_too_large" in huge
    many = _exchange(port, [start + b"".join(b"X-%d: 1\r\n" % i for i in range(500)) + b"\r\n"])
    assert many.startswith(b"HTTP/1.1 431")
    started = time.monotonic()
    slow = _exchange(port, [start[i:i + 1] for i in range(len(start))], pause_s=0.3)  # 1 byte every 0.3 s
    assert slow.startswith(b"HTTP/1.1 408") and b"request_timeout" in slow and time.monotonic() - started < 10
    body = b'{"messages":[{"role":"user","content":"hi"}]}'
    head = b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    trickle = _exchange(port, [head + b"Content-Length: %d\r\n\r\n" % len(body)] +
                        [body[i:i + 1] for i in range(len(body))], pause_s=0.2)
    assert b" 408 " in trickle.split(b"\r\n")[0] and b"request_timeout" in trickle
    # Ordinary requests are untouched, on a kept-alive connection too.
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        assert all(client.get("/healthz", headers={"x-pad": "p" * 8000}).status_code == 200 for _ in range(3))


def _clients_that_go_away(port: int) -> None:
    """Five SSE clients reset mid-stream, five that drop the connection halfway through their request body."""
    import socket
    import struct
    import time

    body = json.dumps({"messages": [{"role": "user", "content": "a long story"}], "stream": True,
                       "max_tokens": 300}).encode()
    head = b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            assert b"text/event-stream" in sock.recv(4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + b"Content-Length: 100000\r\n\r\n" + b"{" * 5000)
            time.sleep(0.05)
    time.sleep(2)  # the server notices the resets and cancels those turns


def test_health_command_probes_http_and_redis(redis_info: RedisInfo) -> None:
    with UvicornThread(_tiny_health_app()) as server:
        assert _run("health", "--url", f"{server.url}/ok").returncode == 0
        failing = _run("health", "--url", f"{server.url}/ok", "--url", f"{server.url}/broken")
        assert failing.returncode == 1 and "/broken: HTTP 503" in failing.stderr
    assert _run("health", "--redis", env={"NEXTGPT_REDIS__URL": redis_info.url}).returncode == 0
    down = _run("health", "--redis", "--timeout", "1",
                env={"NEXTGPT_REDIS__URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert down.returncode == 1 and "redis: ConnectionError" in down.stderr


def _tiny_health_app() -> FastAPI:
    app = FastAPI()
    app.get("/ok")(lambda: {"status": "ok"})
    app.get("/broken")(lambda: JSONResponse({"status": "down"}, status_code=503))
    return app


def test_services_starting_together_build_the_tiny_bundle_once(tmp_path: Path) -> None:
    code = ("import logging; logging.basicConfig(level=logging.INFO); "
            "from services.cli.bundles import resolve_bundle; from services.contracts.settings import load_settings; "
            "print(resolve_bundle(load_settings()).manifest.name)")
    env = {**os.environ, "NEXTGPT_CACHE_DIR": str(tmp_path), "NEXTGPT_BUNDLE": "tiny", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err[-2000:] for _, err in outputs]
    assert all(out.strip() == "nextgpt-tiny" for out, _ in outputs)
    assert sum("building the tiny bundle" in err for _, err in outputs) == 1


def test_a_service_whose_model_cannot_load_exits_with_the_reason(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, broken)
    weights = broken / "encoder" / "imagebind.safetensors"
    state = load_file(str(weights))
    state.pop("modality_trunks.vision.blocks.0.norm_1.weight")  # passes the manifest checks, fails the load
    save_file(state, str(weights))
    result = _run("encoder", "serve", "--bundle", str(broken), "--port", str(free_port()))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "encoder failed to load its model" in result.stderr and "norm_1" in result.stderr
