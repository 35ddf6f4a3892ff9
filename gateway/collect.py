"""A turn's events gathered into one ``ChatResponse`` (the non-streaming answer of ``/v1/chat`` and of the OpenAI
endpoint): text, artifacts, usage; when the media outlast ``wait_s`` after the text, what is there so far."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from gateway.turn_events import (
    ArtifactCompleted, ArtifactFailed, ArtifactQueued, MessageDelta, TextComplete, TurnDone, TurnEvent,
)
from services.contracts.chat import ArtifactOut, ChatResponse, Usage


async def collect(events: AsyncIterator[TurnEvent], wait_s: float, conversation_id: str) -> ChatResponse:
    text: list[str] = []
    artifacts: dict[str, ArtifactOut] = {}
    deadline: float | None = None
    usage = Usage(prompt_tokens=0, completion_tokens=0)
    timings: dict[str, float] = {}
    try:
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = await asyncio.wait_for(anext(events), timeout)
            except (TimeoutError, StopAsyncIteration):
                break
            if isinstance(event, TurnDone):
                inline = {job_id: a.data for job_id, a in artifacts.items() if a.data}
                return ChatResponse(conversation_id=event.conversation_id, text=event.text,
                                    artifacts=[ArtifactOut(**a, data=inline.get(a["job_id"])) for a in event.artifacts],
                                    usage=Usage(**event.usage), finish_reason=event.finish_reason,
                                    timings=event.timings)
            if isinstance(event, TextComplete):
                deadline = time.monotonic() + wait_s  # the turn is saved: its media get wait_s more
                usage = Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)
                timings = event.timings
            elif isinstance(event, MessageDelta):
                text.append(event.text)
            elif isinstance(event, ArtifactQueued):
                artifacts[event.job_id] = ArtifactOut(job_id=event.job_id, modality=event.modality, state="queued")
            elif isinstance(event, ArtifactCompleted):
                artifacts[event.artifact.job_id] = event.artifact
            elif isinstance(event, ArtifactFailed):  # queued before, or refused by a full queue at once
                artifacts[event.job_id] = event.as_artifact()
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
    # The media outlasted the wait: the client polls GET /v1/jobs/{job_id} for them. The conversation already
    # holds the turn; its media join it when they complete.
    return ChatResponse(conversation_id=conversation_id, text="".join(text), artifacts=list(artifacts.values()),
                        usage=usage, finish_reason="media_pending", timings=timings)
