"""The OpenAI Chat Completions endpoint as a serving class over ``ChatService``: request translation in, the
``chat.completion`` / ``chat.completion.chunk`` shapes out.

``content`` is always a string (the official SDKs type it so, and most clients concatenate it). Generated media go
beside it, where an OpenAI client that does not know them simply ignores them: pictures in ``images`` and clips in
``videos`` (lists of ``image_url`` / ``video_url`` parts, the convention OpenRouter's image output uses; ``delta``
carries them when streaming), sounds in OpenAI's own ``audio`` (base64 WAV). A client that sends such a reply back
as history is accepted: media parts of assistant messages are the server's own output and are skipped.

OpenAI's shape has no place for a medium that was not made: such an item would just be missing, and a client could
not tell a full decoder queue (worth a retry) from a model that drew nothing. Beside the media, ``media_errors``
lists the failed ones (``modality``, ``job_id``, ``error``; ``delta.media_errors`` when streaming) and, when a
non-streamed answer's wait ran out first, ``media_pending`` those still being made (``modality``, ``job_id``: poll
``GET /v1/jobs/{job_id}``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from gateway.chat import ChatService
from gateway.collect import collect
from gateway.disconnect import ClientWatch
from gateway.first_event import FirstEvent
from gateway.media_fetch import MediaFetcher
from gateway.openai_compat import (
    OpenAIChatRequest, RemoteMedia, audio_payload, completion_id, image_part, to_chat_request,
)
from gateway.turn_events import ArtifactCompleted, ArtifactFailed, MessageDelta, TurnDone, TurnEvent
from services.contracts.chat import ArtifactOut
from services.contracts.errors import InvalidRequestError, NextGPTError, invalid_fields
from services.contracts.ids import is_hex_id
from services.contracts.storage import ArtifactStore
from services.contracts.settings import GatewaySettings


def _finish(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, "stop")


class OpenAIServingChat:
    def __init__(self, chat: ChatService, store: ArtifactStore, settings: GatewaySettings,
                 model_names: dict[str, str | None], fetcher: MediaFetcher | None = None,
                 stopping: asyncio.Event | None = None) -> None:
        """``model_names``: served model id -> LoRA adapter (None: the base model). ``fetcher``: for media given by
        http(s) URL (None: such parts are refused). ``stopping``: set when the server's stop grace is over (the
        replies under way end: ``ChatService.run``)."""
        self.chat, self.store, self.settings, self.model_names = chat, store, settings, model_names
        self.fetcher, self.stopping = fetcher, stopping

    async def create(self, raw: bytes, owner: str | None, url_for: Callable[[str], str],
                     client: ClientWatch) -> Response:
        """``client``: the request's, watched while a non-streamed answer is under way."""
        try:
            body = OpenAIChatRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise invalid_fields(exc) from exc
        chat_request, parts = to_chat_request(body, self.model_names, self.settings.max_upload_bytes,
                                              self.settings.max_files, self.chat.refs,
                                              await self._made_sounds(body, owner, url_for))
        conversation, params, media = await self.chat.prepare(chat_request, await self._fetched(parts), owner)
        cid, created = completion_id(), int(time.time())
        if body.stream:
            turn = FirstEvent(self.chat.run(chat_request, conversation, params, media, url_for, owner,
                                            stopping=self.stopping))
            await turn.check(client)  # refused before the LLM takes it: this response's status
            events = turn.events()
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._stream(events, cid, created, body.model, include_usage),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        events = self.chat.run(chat_request, conversation, params, media, url_for, owner, keep_jobs=client.present,
                               stopping=self.stopping)
        result = await client.guard(collect(events, chat_request.wait_s, conversation.id))
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        for artifact in result.artifacts:
            await self._attach(message, artifact)
        usage = result.usage
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": message, "finish_reason": _finish(result.finish_reason)}],
            "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                      "total_tokens": usage.prompt_tokens + usage.completion_tokens},
            "conversation_id": result.conversation_id,
        })

    async def _fetched(self, parts: dict[str, bytes | RemoteMedia]) -> dict[str, bytes]:
        """The parts' bytes, those given by URL fetched."""
        remote = {where: part.url for where, part in parts.items() if isinstance(part, RemoteMedia)}
        if remote and self.fetcher is None:
            where = next(iter(remote))
            raise InvalidRequestError(f"{where}: this server does not fetch media URLs; send the medium as a base64 "
                                      "data URL (operators: NEXTGPT_GATEWAY__MEDIA_URL_FETCH)", code="unsupported_url",
                                      param=where)
        fetched = await self.fetcher.fetch_all(remote) if remote and self.fetcher is not None else {}
        return {where: fetched[where] if isinstance(part, RemoteMedia) else part for where, part in parts.items()}

    async def _made_sounds(self, body: OpenAIChatRequest, owner: str | None,
                           url_for: Callable[[str], str]) -> dict[str, str]:
        """Sounds of earlier answers, sent back by their ``audio.id`` (OpenAI's multi-turn audio; the id is the
        decode job's): job id -> the artifact's URL, which the translation takes as a picture's. Only the caller's
        own jobs, the newest up to the bound on media per request (another's id is as unknown as a made-up one)."""
        ids = [audio["id"] for m in body.messages if m.get("role") == "assistant"
               and isinstance(audio := m.get("audio"), dict) and is_hex_id(audio.get("id"))]
        found: dict[str, str] = {}
        for job_id in list(dict.fromkeys(reversed(ids)))[:self.chat.max_media]:
            status = await self.chat.decoders.status(job_id)
            if status is not None and status.owner == owner and status.artifact is not None:
                found[job_id] = url_for(status.artifact.key)
        return found

    async def _attach(self, message: dict[str, Any], artifact: ArtifactOut) -> None:
        """An artifact into a message or delta: completed, ``audio`` or one more entry of ``images``/``videos``;
        failed, an entry of ``media_errors``; still being made, of ``media_pending``."""
        if artifact.state in ("queued", "running"):
            message.setdefault("media_pending", []).append({"modality": artifact.modality, "job_id": artifact.job_id})
            return
        if artifact.state != "completed" or not artifact.url:
            message.setdefault("media_errors", []).append({"modality": artifact.modality, "job_id": artifact.job_id,
                                                           "error": artifact.error or artifact.state})
            return
        if artifact.modality == "audio":
            message["audio"] = await self._audio(artifact.job_id, artifact.url)
        else:
            message.setdefault(f"{artifact.modality}s", []).append(image_part(artifact.modality, artifact.url))

    async def _audio(self, job_id: str, url: str) -> dict[str, Any]:
        key = url.split("/v1/artifacts/", 1)[1].split("?", 1)[0]
        data = await asyncio.to_thread(self.store.read, key)
        return audio_payload(job_id, data, self.settings.artifact_url_ttl_s)

    async def _stream(self, events: AsyncIterator[TurnEvent], cid: str, created: int, model: str,
                      include_usage: bool) -> AsyncIterator[bytes]:
        def data(body: dict[str, Any]) -> bytes:
            return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()

        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            body = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if include_usage:  # as OpenAI's: every chunk has the field, null until the last one's totals
                body["usage"] = None
            return data(body)

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for event in events:
                if isinstance(event, MessageDelta):
                    yield chunk({"content": event.text})
                elif isinstance(event, ArtifactCompleted | ArtifactFailed):
                    delta: dict[str, Any] = {}
                    artifact = event.artifact if isinstance(event, ArtifactCompleted) else event.as_artifact()
                    await self._attach(delta, artifact)
                    yield chunk(delta)
                elif isinstance(event, TurnDone):
                    last: dict[str, Any] = {}  # media still being made (the server stopped): delta.media_pending
                    for artifact in event.artifacts:
                        if artifact["state"] in ("queued", "running"):
                            await self._attach(last, ArtifactOut(**artifact))
                    yield chunk(last, _finish(event.finish_reason))
                    if include_usage:
                        usage = dict(event.usage)
                        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                        yield data({**head, "choices": [], "usage": usage})
                    break
        except NextGPTError as exc:  # server_stopping too: the turn ends itself at the server's stop
            yield data(exc.to_response().model_dump())
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        yield b"data: [DONE]\n\n"
