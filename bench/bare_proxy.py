"""The floor under the gateway's overhead: a bare HTTP hop in Python, on the same server stack (uvicorn with
httptools, aiohttp to the LLM service), that does nothing a gateway must do (no auth, conversation, stream log,
Redis, validation beyond JSON). POST /v1/chat {"messages", "max_tokens", "seed"} is sent on to the LLM service's
/v1/generate, and its NDJSON lines come back as the gateway's SSE events (message.delta, done), each as it comes.
Run by ``bench.gateway_overhead`` beside the gateway: the ratio of this hop to the LLM service direct is what any
Python proxy in front of it costs on that machine."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from services.contracts.llm import GenerateParams, GenerateRequest, Turn


def build_app(llm_url: str) -> Starlette:
    sessions: list[aiohttp.ClientSession] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        sessions.append(aiohttp.ClientSession())
        yield
        await sessions[0].close()

    async def chat(request: Request) -> Response:
        body = await request.json()
        params = GenerateParams(turns=[Turn(role="user", text=body["messages"][-1]["content"])],
                                max_tokens=body["max_tokens"], seed=body["seed"], temperature=0.0)
        upstream = await sessions[0].post(f"{llm_url}/v1/generate",
                                          data=GenerateRequest(params=params).model_dump_json(),
                                          headers={"content-type": "application/json"})
        await upstream.content.readline()  # accepted: the headers go out now, as the gateway's do

        async def events() -> AsyncIterator[bytes]:
            try:
                async for line in upstream.content:
                    if not line.strip():
                        continue
                    data = json.loads(line)
                    if data["type"] == "delta":
                        yield b"event: message.delta\ndata: " + json.dumps({"text": data["text"]}).encode() + b"\n\n"
                    elif data["type"] == "done":
                        usage = {"completion_tokens": data["completion_tokens"]}
                        yield b"event: done\ndata: " + json.dumps({"usage": usage}).encode() + b"\n\n"
            finally:
                upstream.release()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/v1/chat", chat, methods=["POST"]), Route("/healthz", healthz)],
                     lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llm-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(build_app(args.llm_url), host="127.0.0.1", port=args.port, log_level="warning", http="httptools")


if __name__ == "__main__":
    main()
