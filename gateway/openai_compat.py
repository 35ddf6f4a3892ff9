"""``POST /v1/chat/completions``: the OpenAI Chat Completions shape over the same ChatService.

Inputs: text, images as ``image_url`` data URLs, audio as ``input_audio`` (base64). Remote URLs are refused
(the gateway never fetches URLs a client names), except this server's own artifact URLs: media it made, which an
answer sent back as history carries (``ArtifactRefs``). Outputs (``openai_serving``): text as a string; generated media
beside it. ``modalities`` (e.g. ``["text", "image"]``) becomes ``require_modalities`` and, as it names the
answer's output types, ``allowed_modalities`` (``["text"]``: no media).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.artifact_refs import ArtifactRefs, names_artifact
from services.contracts.chat import ChatMessage, ChatRequest
from services.contracts.errors import InvalidRequestError, invalid_fields

# Parameters before ";base64" (";name=x.png", ";charset=...") are taken: what a file is comes from its bytes.
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(;[^;,]+)*;base64,(?P<data>.+)$", re.DOTALL)


# OpenAI options this server does not honour, with the value that means "not used": anything else is refused with
# a 400 naming the option rather than silently ignored (a client asking for stop strings or tools must know).
UNSUPPORTED: dict[str, Any] = {
    "tools": None, "tool_choice": "none", "functions": None, "function_call": "none", "presence_penalty": 0,
    "frequency_penalty": 0, "logit_bias": None, "logprobs": False, "top_logprobs": 0,
    "response_format": {"type": "text"}, "prediction": None,
}


class AudioOutput(BaseModel):
    """OpenAI's ``audio`` option, which its clients send with ``modalities`` holding audio: the sound comes as WAV
    (the only format made); ``voice`` means nothing to a model whose sounds are its own, and is ignored."""

    model_config = ConfigDict(extra="ignore")
    format: Literal["wav"] = "wav"
    voice: str | dict[str, Any] | None = None


class OpenAIChatRequest(BaseModel):
    # Other unknown options (user, store, metadata...) change nothing about the answer and are ignored.
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unhonoured(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, unused in UNSUPPORTED.items():
                value = data.get(name, unused)
                if value not in (unused, None) and value != [] and value != {}:
                    raise InvalidRequestError(f"{name} is not supported by this server", code="unsupported_parameter",
                                              param=name)
            if data.get("conversation_id") is not None:
                # Our answers name the conversation they were kept as (to go on with at /v1/chat); sent back here it
                # was ignored, and the model answered without the history the client believed it had.
                raise InvalidRequestError(
                    "conversation_id is not taken here: this endpoint keeps no history, send the conversation in "
                    "messages (or go on with the conversation at /v1/chat)", code="unsupported_parameter",
                    param="conversation_id")
        return data

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=256)
    stream: bool = False
    # strict: JSON true is not a number of tokens (lax validation would take it as 1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096, strict=True)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    # OpenAI's range is [0, 1]: clients send 0 (often with temperature 0) for the most likely token each time
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    # OpenAI takes any int64 (some clients send -1); our seeds are 0..2**63-1, so a seed is taken modulo 2**63
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None  # bounds checked with the translated request's (param "stop")
    modalities: list[Literal["text", "image", "video", "audio"]] | None = None
    audio: AudioOutput | None = None
    stream_options: dict[str, Any] | None = None


@dataclass(frozen=True)
class RemoteMedia:
    """A part's medium given by http(s) URL: the serving layer fetches it (``gateway.media_fetch``) or refuses it."""

    url: str


def _decode(url: str, where: str, max_bytes: int) -> bytes | RemoteMedia:
    if urlsplit(url).scheme in ("http", "https"):
        return RemoteMedia(url)
    match = _DATA_URL.match(url)
    if not match:
        raise InvalidRequestError(f"{where}: only http(s) and base64 data URLs are taken", code="unsupported_url",
                                  param=where)
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"{where}: invalid base64", code="invalid_base64", param=where) from exc
    if len(data) > max_bytes:
        raise InvalidRequestError(f"{where}: {len(data)} bytes exceed {max_bytes}", code="file_too_large", param=where)
    return data


def to_chat_request(body: OpenAIChatRequest, model_names: dict[str, str | None], max_bytes: int,
                    max_files: int, refs: ArtifactRefs | None = None,
                    sounds: dict[str, str] | None = None) -> tuple[ChatRequest, dict[str, bytes | RemoteMedia]]:
    """``model_names``: served model id -> LoRA name (None: the base model). Whatever the translated request
    breaks (a content too long, no user message, the assistant's message last) is a 400 naming the field. A
    medium given by http(s) URL is a ``RemoteMedia`` among the uploads, for the caller to fetch."""
    try:
        return _translate(body, model_names, max_bytes, max_files, refs, sounds or {})
    except ValidationError as exc:
        raise invalid_fields(exc, default="messages") from exc


def _translate(body: OpenAIChatRequest, model_names: dict[str, str | None], max_bytes: int,
               max_files: int, refs: ArtifactRefs | None, sounds: dict[str, str]
               ) -> tuple[ChatRequest, dict[str, bytes | RemoteMedia]]:
    if body.model not in model_names:
        raise InvalidRequestError(f"unknown model {body.model!r}; see GET /v1/models", code="model_not_found",
                                  param="model")
    uploads: dict[str, bytes | RemoteMedia] = {}
    messages: list[ChatMessage] = []
    system: list[ChatMessage] = []
    for i, message in enumerate(body.messages):
        role, content = message.get("role"), message.get("content")
        texts, files, artifacts = [], [], []
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else (content or [])
        if not isinstance(parts, list):
            raise InvalidRequestError(f"messages[{i}].content must be a string or a list", code="invalid_content",
                                      param=f"messages[{i}]")
        if role == "assistant":  # the pictures and clips of our own answer, as it gave them (its extension)
            parts = [*parts, *(p for p in [*_list(message.get("images")), *_list(message.get("videos"))]
                               if isinstance(p, dict) and p.get("type") in ("image_url", "video_url"))]
            audio = message.get("audio")
            if isinstance(audio, dict) and audio.get("id") in sounds:  # its sound, by id (``sounds``: their URLs)
                artifacts.append(sounds[audio["id"]])
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if role in ("system", "developer") and kind != "text":  # folded into the first turn's words
                raise InvalidRequestError(f"{where}: {role} messages take text only", code="unsupported_content_part",
                                          param=where)
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise InvalidRequestError(f"{where}.text must be a string", code="invalid_content",
                                              param=f"{where}.text")
                texts.append(text)
            elif kind in ("image_url", "video_url"):
                ref = part.get(kind)
                # {"url": "data:..."} as OpenAI documents it; a bare string is taken as the URL itself.
                url = str(ref if isinstance(ref, str) else ref.get("url", "") if isinstance(ref, dict) else "")
                if names_artifact(url):  # media this server made: the model sees them again (ChatService)
                    if role != "assistant" and (refs is None or refs.key(url) is None):
                        raise InvalidRequestError(f"{where}: not an artifact URL this server gave out",
                                                  code="invalid_artifact_url", param=where)
                    artifacts.append(url)
                elif role != "assistant":
                    files.append(_add(uploads, _decode(url, where, max_bytes), where, max_files))
                # (an assistant's other media: history from elsewhere, whose words are what counts)
            elif role == "assistant" and kind == "input_audio":
                continue
            elif kind == "input_audio":
                audio = part.get("input_audio")
                if not isinstance(audio, dict):
                    raise InvalidRequestError(f"{where}.input_audio must be an object with 'data' and 'format'",
                                              code="invalid_content", param=where)
                try:
                    data = base64.b64decode(str(audio.get("data", "")), validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise InvalidRequestError(f"{where}: invalid base64", code="invalid_base64", param=where) from exc
                files.append(_add(uploads, data, where, max_files))
            else:
                raise InvalidRequestError(f"{where}: unsupported content part {kind!r}",
                                          code="unsupported_content_part", param=where)
        if role not in ("system", "developer", "user", "assistant"):
            raise InvalidRequestError(f"messages[{i}]: unsupported role {role!r}", code="unsupported_role",
                                      param=f"messages[{i}].role")
        # "developer": OpenAI's newer name for system instructions (they join the prompt's first turn's words)
        instructions = role in ("system", "developer")
        try:
            out = ChatMessage(role="system" if instructions else role, content=" ".join(texts), files=files,
                              artifacts=artifacts)
        except ValidationError as exc:
            raise invalid_fields(exc, where=f"messages[{i}]") from exc
        (system if instructions else messages).append(out)
    messages = [*system, *messages]  # OpenAI takes instructions anywhere; the prompt has them first
    required: list[Any] = [m for m in (body.modalities or []) if m != "text"]
    # top_p 0 keeps only the most likely token: greedy, which is how both backends run it (vLLM refuses 0).
    greedy = body.top_p == 0.0
    request = ChatRequest(
        messages=messages, stream=body.stream, max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=0.0 if greedy else body.temperature, top_p=None if greedy else body.top_p,
        seed=None if body.seed is None else body.seed % 2**63,
        stop=[body.stop] if isinstance(body.stop, str) else body.stop or [], lora=model_names[body.model],
        # OpenAI's modalities are the answer's output types: those, and no others
        require_modalities=required, allowed_modalities=None if body.modalities is None else required,
    )
    return request, uploads


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _add(uploads: dict[str, bytes | RemoteMedia], data: bytes | RemoteMedia, where: str, max_files: int) -> str:
    """The part's place in the request names its upload, so that what the encoder finds wrong with it (not a
    picture, too long a sound) names the part the client sent. What a file is comes from its bytes (the format a
    client declares is not needed)."""
    if len(uploads) >= max_files:
        raise InvalidRequestError(f"more than {max_files} media parts", code="too_many_files", param="messages")
    uploads[where] = data
    return where


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def image_part(modality: str, url: str) -> dict[str, Any]:
    kind = "image_url" if modality == "image" else "video_url"
    return {"type": kind, kind: {"url": url}}


def audio_payload(job_id: str, data: bytes, ttl_s: int) -> dict[str, Any]:
    return {"id": job_id, "data": base64.b64encode(data).decode(), "expires_at": int(time.time()) + ttl_s,
            "transcript": "", "format": "wav"}
