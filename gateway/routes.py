"""Thin HTTP routes of the public API over ChatService, the artifact store and the decoder queue."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from gateway.collect import collect
from gateway.disconnect import ClientWatch
from gateway.first_event import FirstEvent
from gateway.sse import HEARTBEAT, sse_event
from gateway.state import GatewayState
from gateway.streams import LogEntry
from services.contracts.chat import ArtifactOut, ChatRequest, ChatResponse, StreamCancelled, Usage
from services.contracts.errors import ErrorResponse, InvalidRequestError, NextGPTError, NotFoundError, invalid_fields
from services.contracts.ids import is_hex_id
from services.web.errors import error_json
from services.web.forms import read_form

log = logging.getLogger(__name__)
router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 429, 503)
}
# At most 18 digits: a larger offset is past any artifact (and int() of thousands of digits raises).
_RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$")
_MAX_EVENT_ID = 10**12


def state_of(request: Request) -> GatewayState:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def _read_chat_request(request: Request, st: GatewayState) -> tuple[ChatRequest, dict[str, bytes]]:
    content_type = request.headers.get("content-type", "")
    uploads: dict[str, bytes] = {}
    if content_type.startswith("multipart/form-data"):
        form = await read_form(request, max_files=st.settings.max_files, max_fields=4,
                               setting="NEXTGPT_GATEWAY__MAX_FILES")
        try:
            unknown = sorted(set(form.keys()) - {"request", "files"})
            if unknown:  # a typo ('file', 'json') would otherwise be dropped without a word
                raise InvalidRequestError(f"unknown multipart parts {unknown}: send 'request' and 'files'",
                                          code="invalid_multipart", param=unknown[0])
            if len(form.getlist("request")) > 1:
                raise InvalidRequestError("more than one 'request' part", code="invalid_multipart", param="request")
            raw = form.get("request")
            raw = await raw.read() if isinstance(raw, UploadFile) else raw
            for upload in form.getlist("files"):
                if not isinstance(upload, UploadFile) or not upload.filename:
                    raise InvalidRequestError("every 'files' part needs a file name", code="invalid_multipart",
                                              param="files")
                if upload.filename in uploads:
                    raise InvalidRequestError(f"file name {upload.filename!r} is used twice", code="duplicate_file",
                                              param="files")
                uploads[upload.filename] = await upload.read()
        finally:
            await form.close()
        if raw is None:
            raise InvalidRequestError("multipart requests need a 'request' part with the JSON request",
                                      code="missing_request", param="request")
    elif content_type.startswith("application/json"):
        raw = await request.body()
    else:
        raise InvalidRequestError("send application/json, or multipart/form-data with 'request' and 'files'",
                                  code="unsupported_content_type")
    try:
        return ChatRequest.model_validate_json(raw), uploads
    except ValidationError as exc:
        raise invalid_fields(exc) from exc


_FORWARDED_HOST = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?$")
_FORWARDED_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)*/?$")


def _host_allowed(netloc: str, allowed: list[str]) -> bool:
    host = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
    host = host.lower()
    return any(pattern == "*" or host == pattern.lower()
               or (pattern.startswith("*.") and host.endswith(pattern[1:].lower())) for pattern in allowed)


def _base_url(request: Request, st: GatewayState) -> str:
    """Where clients reach us: the configured public URL, else what a trusted reverse proxy says (scheme, host,
    path prefix), else the request itself when its Host is an allowed one. Forwarded headers from anyone else are
    ignored, and a Host outside ``allowed_hosts`` gives relative URLs: a client cannot make us hand out links to a
    host of its choosing."""
    if st.settings.public_base_url:
        return st.settings.public_base_url.rstrip("/")
    base = str(request.base_url).rstrip("/")
    client = request.client.host if request.client else None
    if client is None or client not in st.settings.trusted_proxies:
        netloc = base.partition("://")[2].partition("/")[0]
        return base if _host_allowed(netloc, st.settings.allowed_hosts) else ""
    headers = request.headers
    proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    host = headers.get("x-forwarded-host", "").split(",")[0].strip()
    prefix = headers.get("x-forwarded-prefix", "").strip()
    scheme, _, rest = base.partition("://")
    netloc, _, path = rest.partition("/")
    scheme = proto if proto in ("http", "https") else scheme
    netloc = host if _FORWARDED_HOST.match(host) else netloc
    path = prefix.strip("/") if prefix and _FORWARDED_PREFIX.match(prefix) else path
    return f"{scheme}://{netloc}" + (f"/{path}" if path else "")


def _artifact_urls(request: Request, st: GatewayState) -> Callable[[str], str]:
    """Signed, expiring, absolute artifact URLs for this request's client. The base is worked out at the first
    URL: most turns make none, and a streamed turn's first token should not wait for it."""
    base = functools.cache(lambda: _base_url(request, st))
    return lambda key: base() + st.signer.sign(f"/v1/artifacts/{key}")


# Each event's data: a JSON object (named events of DESIGN.md; OpenAI chunks), or the OpenAI stream's "[DONE]".
_SSE: dict[str, Any] = {"text/event-stream": {"schema": {"anyOf": [{"type": "object"}, {"const": "[DONE]"}]}}}


@router.post("/v1/chat", responses=_ERRORS | {200: {"model": ChatResponse, "content": _SSE,
                                                   "description": "JSON, or server-sent events with stream: true"}})
async def chat(request: Request) -> Response:
    """Multipart (``request`` JSON part + ``files``) or JSON. ``stream: true`` answers server-sent events:
    message.delta, signal, artifact.queued, artifact.progress, artifact.completed, artifact.failed, error, done."""
    st = state_of(request)
    owner = st.keys.owner(request.headers.get("authorization"))
    st.limiter.check(owner)
    chat_request, uploads = await _read_chat_request(request, st)
    conversation, params, media = await st.chat.prepare(chat_request, uploads, owner)
    url_for = _artifact_urls(request, st)

    if chat_request.stream:
        turn = FirstEvent(st.chat.run(chat_request, conversation, params, media, url_for, owner,
                                      stopping=st.streams.closing))
        # The stream is set up while the LLM takes the turn, so that the headers go out at its `accepted`. Set up
        # after `accepted` instead (the LLM request out first), the first token came 0.9 ms later at concurrency 1
        # (2026-12-05, 160 requests per path): the owner key's write then held the headers into the prefill.
        try:
            stream_id = await st.streams.start(turn.events(), owner)
        except BaseException:
            await turn.close()  # no stream: nobody will read what the turn makes
            raise
        entries = await st.streams.attach(stream_id, owner, idle_s=st.settings.heartbeat_s)
        try:
            # Refused before the LLM takes it: this status (its stream ends unread). The client gone meanwhile (a
            # timeout while the LLM is queueing): the turn ends now, rather than when its stream has gone unread
            # for the grace a client that knows the stream's id gets to resume it. While the client waits, the
            # stream is being read: an LLM slow to accept (up to NEXTGPT_LLM__ACCEPT_TIMEOUT_S) is no abandoned
            # stream.
            async with st.streams.reading(stream_id):
                await turn.check(ClientWatch(request.receive))
        except BaseException:
            await entries.aclose()  # type: ignore[attr-defined]
            raise
        return _sse_response(entries, stream_id, st, conversation.id)
    client = ClientWatch(request.receive)
    events = st.chat.run(chat_request, conversation, params, media, url_for, owner, keep_jobs=client.present,
                         stopping=st.streams.closing)
    return JSONResponse((await client.guard(collect(events, chat_request.wait_s, conversation.id))).model_dump())


def _check_stream_id(stream_id: str) -> None:
    """Only ids this server makes reach the log: anything else is a stream that is not there."""
    if not is_hex_id(stream_id):
        raise NotFoundError(f"stream {stream_id!r} not found", code="stream_not_found")


@router.get("/v1/chat/streams/{stream_id}", response_class=StreamingResponse,
            responses=_ERRORS | {200: {"content": _SSE, "description": "Server-sent events"},
                                 410: {"model": ErrorResponse}})
async def resume_stream(stream_id: str, request: Request,
                        after: Annotated[int | None, Query(ge=0, le=_MAX_EVENT_ID)] = None) -> Response:
    """Reattach to a streaming chat turn: the events after ``Last-Event-ID`` (else ``after``), then the live rest.
    The stream id is the ``x-stream-id`` header of the original response. 410 when those events are gone."""
    st = state_of(request)
    owner = st.keys.owner(request.headers.get("authorization"))
    _check_stream_id(stream_id)
    last = request.headers.get("last-event-id", "").strip()
    if last:
        # The header wins over ?after=: an EventSource opened on ...?after=N reconnects to that same URL with the
        # last id it has seen in Last-Event-ID, and the query would replay everything from N again.
        # ASCII digits only ("²".isdigit() is True, int("²") is not), and a bounded value.
        if not (re.fullmatch(r"[0-9]{1,12}", last) and int(last) <= _MAX_EVENT_ID):
            raise InvalidRequestError("Last-Event-ID must be an event id of this stream", code="invalid_event_id",
                                      param="Last-Event-ID")
        after = int(last)
    elif after is None:
        after = 0
    try:
        events = await st.streams.attach(stream_id, owner, after, st.settings.heartbeat_s)
    except InvalidRequestError as exc:
        if not last and exc.param == "Last-Event-ID":
            exc.param = "query.after"  # the id that does not exist came in the query
        raise
    return _sse_response(events, stream_id, st)


@router.post("/v1/chat/streams/{stream_id}/cancel", responses=_ERRORS)
async def cancel_stream(stream_id: str, request: Request) -> StreamCancelled:
    """Stop a streaming chat turn now, on whichever replica runs it: its generation and its decode jobs. Its
    readers get an ``error`` event with code ``stream_cancelled`` and the stream ends; a turn whose text had not
    ended is not kept in the conversation. (Without this, a stream is cancelled once no client has read it for
    ``RESUME_GRACE_S``.)"""
    st = state_of(request)
    owner = st.keys.owner(request.headers.get("authorization"))
    _check_stream_id(stream_id)
    return StreamCancelled(stream_id=stream_id, cancelled=await st.streams.cancel(stream_id, owner))


def _sse_response(entries: AsyncIterator[list[LogEntry]], stream_id: str, st: GatewayState,
                  conversation_id: str | None = None) -> StreamingResponse:
    """``conversation_id``: sent as ``x-conversation-id`` (a stream that ends without ``done``, cancelled or
    failed after its text was kept, still tells the client which conversation to go on with)."""
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no", "x-stream-id": stream_id}
    if conversation_id is not None:
        headers["x-conversation-id"] = conversation_id
    # The headers go out now, at the LLM's `accepted` (before its prefill): the client sets up its side of the
    # response while the first token is computed. Holding them for the first chunk cost 0.04-0.06 of the
    # concurrency-1 ratio on a 2-core machine, 0.13-0.15 with the LLM engine on one of its cores (2026-12-05).
    return StreamingResponse(_sse(entries), media_type="text/event-stream", headers=headers)


async def _sse(entries: AsyncIterator[list[LogEntry]]) -> AsyncIterator[bytes]:
    """The log's entries as SSE, one write per batch (an empty batch: nothing came for ``heartbeat_s``). Whatever
    is already waiting goes out in one write: under load a reply's events pile up between two turns of this loop,
    and one send (through the middleware stack, one syscall) per batch instead of per event is what keeps the
    gateway from becoming the bottleneck of a busy LLM."""
    try:
        async for batch in entries:
            if not batch:
                yield HEARTBEAT  # keeps proxies from closing a quiet stream (long decodes)
                continue
            chunk = []
            for event_id, name, data in batch:
                chunk.append(sse_event(event_id, name, data))
                if name in ("done", "error"):
                    yield b"".join(chunk)
                    return
            yield b"".join(chunk)
    except NextGPTError as exc:  # the log itself failed (no id: the client may resume from its last one)
        yield sse_event(None, "error", exc.to_response().model_dump())
    except Exception:
        log.exception("reading a chat stream failed")
        yield sse_event(None, "error", {"error": {"type": "internal_error", "code": "stream_read_failed",
                                                  "message": "reading the stream failed; reconnect with "
                                                             "Last-Event-ID", "param": None}})
    finally:  # the reader stops touching the stream: a client gone shows, and its turn ends after the grace
        await entries.aclose()  # type: ignore[attr-defined]


_BYTES: dict[str, Any] = {m: {"schema": {"type": "string", "format": "binary"}}
                          for m in ("image/png", "video/mp4", "audio/wav", "application/octet-stream")}


@router.api_route("/v1/artifacts/{key:path}", methods=["GET", "HEAD"], response_class=StreamingResponse,
            responses=_ERRORS | {200: {"content": _BYTES, "description": "The artifact's bytes"},
                                 206: {"content": _BYTES, "description": "One byte range"},
                                 416: {"model": ErrorResponse, "description": "Range not satisfiable"}})
async def artifact(key: str, request: Request, expires: int | None = None, sig: str | None = None) -> Response:
    """The artifact's bytes (signed, expiring URL from the chat response); supports one byte range."""
    st = state_of(request)
    st.signer.verify(f"/v1/artifacts/{key}", expires, sig)
    meta = await asyncio.to_thread(st.store.head, key)  # a missing artifact is a 404 here, not at the store
    if st.redirect_downloads_ttl_s is not None:
        # The store serves the bytes (ranges included); the URL never outlives the one the client was given.
        ttl = st.redirect_downloads_ttl_s if expires is None else \
            max(1, min(st.redirect_downloads_ttl_s, expires - int(time.time())))
        location = await asyncio.to_thread(st.store.presigned_url, key, ttl)
        if location:
            return Response(status_code=307, headers={"location": location, "cache-control": "no-store"})
    start, end, status = 0, meta.size, 200
    header = request.headers.get("range")
    headers = {"accept-ranges": "bytes", "cache-control": "private, max-age=3600"}
    # A range in a unit other than bytes is ignored, as RFC 9110 14.2 allows: the whole artifact is the answer; so
    # are several ranges at once (one multipart answer is not worth it; 416 would say none of them exist).
    if header and header.strip().lower().startswith("bytes=") and "," not in header:
        match = _RANGE.match(header.strip().lower())
        if not match or (not match.group(1) and not match.group(2)):
            return _unsatisfiable(meta.size, f"Range {header.strip()[:100]!r} is not one byte range (bytes=FIRST-LAST, "
                                             "bytes=FIRST- or bytes=-LENGTH)")
        if match.group(1):
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, meta.size) if match.group(2) else meta.size
        else:  # suffix range: the last N bytes
            start = max(0, meta.size - int(match.group(2)))
        if start >= meta.size or start >= end:
            return _unsatisfiable(meta.size, f"Range {header.strip()[:100]!r} has no byte of this artifact "
                                             f"({meta.size} bytes)")
        status = 206
        headers["content-range"] = f"bytes {start}-{end - 1}/{meta.size}"
    headers["content-length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status, media_type=meta.mime, headers=headers)
    chunks = await asyncio.to_thread(st.store.iter_bytes, key, start, end)
    return StreamingResponse(_iterate(chunks), status_code=status, media_type=meta.mime, headers=headers)


def _unsatisfiable(size: int, message: str) -> Response:
    """416 in the shared error shape, with the ``Content-Range`` RFC 9110 asks for (the artifact's length)."""
    response = error_json(416, "invalid_request_error", "range_not_satisfiable", message, "Range")
    response.headers["content-range"] = f"bytes */{size}"
    return response


async def _iterate(chunks: Any) -> AsyncIterator[bytes]:
    while True:
        chunk = await asyncio.to_thread(next, chunks, None)
        if chunk is None:
            return
        yield chunk


@router.get("/v1/jobs/{job_id}", responses=_ERRORS)
async def job(job_id: str, request: Request) -> dict[str, Any]:
    """A decode job's state (and its artifact's signed URL once completed); only to the caller that started it."""
    st = state_of(request)
    owner = st.keys.owner(request.headers.get("authorization"))
    if not is_hex_id(job_id):  # only ids this server makes reach the job book
        raise NotFoundError(f"job {job_id!r} not found", code="job_not_found")
    status = await st.decoders.status(job_id)
    # Someone else's job looks exactly like a missing one.
    if status is None or status.owner != owner:
        raise NotFoundError(f"job {job_id} not found", code="job_not_found")
    body = status.model_dump(mode="json", exclude={"owner"})
    if status.artifact is not None:
        body["url"] = _artifact_urls(request, st)(status.artifact.key)
    return body


@router.post("/v1/chat/completions", responses=_ERRORS | {
    200: {"content": {"application/json": {"schema": {"type": "object"}}, **_SSE},
          "description": "A chat.completion, or chat.completion.chunk events with stream: true"}})
async def chat_completions(request: Request) -> Response:
    """OpenAI Chat Completions: text, data-URL images and base64 audio in; text (always a string), generated
    images and videos in ``images`` / ``videos``, audio in ``audio``. ``modalities`` asks for media."""
    st = state_of(request)
    owner = st.keys.owner(request.headers.get("authorization"))
    st.limiter.check(owner)
    raw = await request.body()
    return await st.openai.create(raw, owner, _artifact_urls(request, st),
                                 ClientWatch(request.receive))
