"""The last chunks of an OpenAI stream (``OpenAIServingChat._stream``), from the turn's events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from gateway.openai_serving import OpenAIServingChat
from gateway.turn_events import MessageDelta, TurnDone, TurnEvent
from services.contracts.settings import GatewaySettings


def _chunks(*turn: TurnEvent) -> list[object]:
    async def events() -> AsyncIterator[TurnEvent]:
        for event in turn:
            yield event

    async def read() -> list[bytes]:
        serving = OpenAIServingChat(None, None, GatewaySettings(), {"nextgpt": None})  # type: ignore[arg-type]
        return [part async for part in serving._stream(events(), "chatcmpl-1", 0, "nextgpt", False)]

    lines = [part.decode().removeprefix("data: ").strip() for part in asyncio.run(read())]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def test_media_still_being_made_when_the_turn_ends_are_named_in_the_last_chunk() -> None:
    """A turn the server's stop ends after its text was kept (``media_pending``): its client learns which jobs to
    follow, as a non-streamed answer's ``message.media_pending`` tells."""
    pending = {"job_id": "a" * 32, "modality": "video", "state": "running"}
    made = {"job_id": "b" * 32, "modality": "image", "state": "failed", "error": "overloaded: full"}
    chunks = _chunks(MessageDelta("Here."), TurnDone("c" * 32, "media_pending", "Here.",
                                                     {"prompt_tokens": 3, "completion_tokens": 2}, [pending, made]))
    assert chunks[-1] == "[DONE]"
    last = chunks[-2]["choices"][0]  # type: ignore[index]
    assert last["finish_reason"] == "stop"
    assert last["delta"] == {"media_pending": [{"modality": "video", "job_id": "a" * 32}]}


def test_a_turn_that_ended_whole_has_an_empty_last_delta() -> None:
    chunks = _chunks(MessageDelta("Hi."), TurnDone("c" * 32, "stop", "Hi.", {"prompt_tokens": 3, "completion_tokens": 2}))
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}  # type: ignore[index]
