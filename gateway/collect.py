"""A turn's events gathered into one ``ChatResponse`` (the non-streaming answer of ``/v1/chat`` and of the OpenAI
endpoint): text, artifacts, usage; when the media outlast ``wait_s`` after the text, what is there so far."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from services.contracts.chat import ArtifactOut, ChatResponse, Usage


async def collect(events: AsyncIterator[tuple[str, dict[str, Any]]], wait_s: float,
                   conversation_id: str) -> ChatResponse:
    text: list[str] = []
    artifacts: dict[str, ArtifactOut] = {}
    deadline: float | None = None
    usage = Usage(prompt_tokens=0, completion_tokens=0)
    try:
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                name, data = await asyncio.wait_for(anext(events), timeout)
            except (TimeoutError, StopAsyncIteration):
                break
            if name == "done":
                inline = {job_id: a.data for job_id, a in artifacts.items() if a.data}
                return ChatResponse(conversation_id=data["conversation_id"], text=data["text"],
                                    artifacts=[ArtifactOut(**a, data=inline.get(a["job_id"])) for a in data["artifacts"]],
                                    usage=Usage(**data["usage"]), finish_reason=data["finish_reason"],
                                    timings=data["timings"])
            if name == "_llm_done":
                deadline = time.monotonic() + wait_s  # text is complete (and the turn saved): media get wait_s more
                usage = Usage(**data["usage"])
            elif name == "message.delta":
                text.append(data["text"])
            elif name == "artifact.queued":
                artifacts[data["job_id"]] = ArtifactOut(job_id=data["job_id"], modality=data["modality"],
                                                        state="queued")
            elif name == "artifact.completed":
                artifacts[data["job_id"]] = ArtifactOut(**data)
            elif name == "artifact.failed":
                artifacts[data["job_id"]].state, artifacts[data["job_id"]].error = "failed", data["error"]
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
    # The media outlasted the wait: the client polls GET /v1/jobs/{job_id} for them. The conversation already
    # holds the turn; its media join it when they complete.
    return ChatResponse(conversation_id=conversation_id, text="".join(text), artifacts=list(artifacts.values()),
                        usage=usage, finish_reason="media_pending")
