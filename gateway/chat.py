"""ChatService: one chat turn end to end. Media are encoded, the LLM streams text and signal events, each
complete signal group becomes a decode job at once (while the text keeps streaming), and job progress and
results are merged into the same event stream. Leaving the stream cancels the generation and the jobs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import ValidationError
from safetensors.numpy import save

from gateway.artifact_refs import ArtifactRefs
from gateway.conversations import Conversation, ConversationStore, StoredTurn
from gateway.metrics import GatewayMetrics
from gateway.stopping import server_stopping
from gateway.turn_events import (
    ArtifactCompleted, ArtifactFailed, ArtifactProgress, ArtifactQueued, MessageDelta, ReplyAccepted, SignalChosen,
    TextComplete, TurnDone, TurnEvent,
)
from services.contracts.chat import ArtifactOut, ChatMessage, ChatRequest
from services.contracts.bundle_manifest import BundleManifest
from services.llm.prompt import check_prompt_chars, prompt_starts
from services.llm.signals import check_signal_budget
from services.contracts.decoders import (
    decode_pixels, describe_size,
    ARTIFACT_FORMATS,
    CONDITIONING_TENSOR,
    DecodeJob,
    DecoderQueue,
    JobEvent,
    new_job_id,
)
from services.contracts.encoder import EncoderClient, MediaInput
from services.contracts.errors import (
    InvalidRequestError, NextGPTError, NotFoundError, PayloadTooLargeError, ServiceUnavailableError,
)
from services.contracts.llm import Accepted, Done, GenerateParams, LLMClient, SignalEvent, TextDelta, Turn
from services.contracts.storage import ArtifactStore, new_key

log = logging.getLogger(__name__)


@dataclass
class _Turn:
    text: list[str] = field(default_factory=list)
    artifacts: dict[str, ArtifactOut] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # storage keys of completed artifacts
    done: Done | None = None
    kept: bool = False  # the reply's text is in its conversation


class ChatService:
    def __init__(self, encoder: EncoderClient, llm: LLMClient, decoders: DecoderQueue, store: ArtifactStore,
                 conversations: ConversationStore, inline_max_bytes: int = 16 * 1024 * 1024,
                 metrics: GatewayMetrics | None = None, max_decode_pixels: int = 2**21,
                 manifest: BundleManifest | None = None, max_media: int = 16, refs: ArtifactRefs | None = None,
                 encode_batch: int = 8) -> None:
        """``refs``: reads this server's artifact URLs in messages' ``artifacts`` (None: none are taken).
        ``encode_batch``: the encoder's bound on items per call (``encoder.max_files``)."""
        self.encoder, self.llm, self.decoders, self.store, self.refs = encoder, llm, decoders, store, refs
        self.encode_batch = encode_batch
        self.max_media = max_media  # the LLM service's bound on media items per request (llm.max_media)
        self.conversations, self.inline_max_bytes, self.metrics = conversations, inline_max_bytes, metrics
        self.max_decode_pixels = max_decode_pixels
        self.manifest = manifest

    async def prepare(self, request: ChatRequest, uploads: dict[str, bytes], owner: str | None
                      ) -> tuple[Conversation, GenerateParams, np.ndarray | None]:
        if self.manifest is not None:  # the LLM service checks these too; here they cost no upload encoding
            check_signal_budget(self.manifest, request.require_modalities, request.max_tokens)
            check_prompt_chars([m.content for m in request.messages], self.manifest.llm.max_model_len)
        self._check_decode_budget(request)
        if request.conversation_id:
            found = await self.conversations.load(request.conversation_id, owner)
            if found is None:
                raise NotFoundError(f"conversation {request.conversation_id} not found (or expired)",
                                    code="conversation_not_found", param="conversation_id")
            conversation = found
        else:
            conversation = Conversation.new(owner)
        system = request.system()
        if system and conversation.turns:
            raise InvalidRequestError(
                f"system messages open a conversation; conversation {conversation.id} has begun (send them with its "
                "first request)", code="system_after_start", param="messages")
        if system:
            conversation.system = system
        referenced = [name for m in request.messages for name in m.files]
        missing = sorted(set(referenced) - set(uploads))
        if missing:
            raise InvalidRequestError(f"messages refer to files that were not uploaded: {missing}",
                                      code="missing_file", param="files")
        unused = sorted(set(uploads) - set(referenced))
        if unused:
            raise InvalidRequestError(f"uploaded files no message refers to: {unused}", code="unused_file",
                                      param="files")
        if any(m.files for m in request.messages if m.role == "assistant"):
            raise InvalidRequestError("only user messages may carry files", code="invalid_files", param="messages")
        # The request's own media (uploads, and what users' messages point at) are never cut: past the LLM's bound
        # they are refused here, before any lookup or encoding.
        asked = len(referenced) + sum(len(m.artifacts) for m in request.messages if m.role == "user")
        if asked > self.max_media:
            raise PayloadTooLargeError(f"{asked} media items exceed the limit of {self.max_media}",
                                       code="too_many_media", param="messages")
        made = [await self._artifact_keys(i, m) for i, m in enumerate(request.messages)]
        checked = {k for m, keys in zip(request.messages, made, strict=True) if m.role == "user" for k in keys}
        made = _newest_fit(made, request.messages, self.max_media - asked)
        await self._encode_history(conversation)
        names = list(dict.fromkeys(referenced))
        vectors: dict[str, np.ndarray] = {}
        if names:
            vectors = dict(zip(names, await self._encode([MediaInput(name=n, data=uploads[n]) for n in names]),
                               strict=True))
        kept = len(conversation.turns)
        for message, keys in zip(request.messages, made, strict=True):
            if message.role != "system":  # kept apart (the conversation's system), for every prompt of it
                conversation.turns.append(StoredTurn(message.role, message.content,
                                                     [vectors[n] for n in message.files], artifact_keys=keys))
        # a message's uploads first, then its artifacts
        await self._encode_generated(conversation.turns[kept:], checked)
        # Pictures and sounds of a kept conversation add up over its turns; past the LLM's bound on media per
        # request its oldest exchanges are left out (the prompt builder does the same for the context's tokens).
        start = _media_window(conversation.turns, kept, self.max_media)
        turns, media = _flatten(conversation.turns[start:])
        try:
            params = GenerateParams(
                turns=turns, max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                seed=request.seed, lora=request.lora, stop=request.stop, allowed_modalities=request.allowed_modalities,
                require_modalities=request.require_modalities, history_turns=kept - start,
                system=conversation.system,
            )
        except ValidationError as exc:  # a combination the request schema alone cannot rule out
            reason = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
            raise InvalidRequestError(f"messages: {reason}", code="invalid_request", param="messages") from exc
        return conversation, params, media

    def _check_decode_budget(self, request: ChatRequest) -> None:
        """The decoder options apply to every item the reply may make: each modality it may make is checked with
        the values a worker will resolve (the request's, else the bundle's defaults), before any work. The workers
        enforce the same budget on what they resolve."""
        d = request.decoder
        if self.manifest is None:
            sizes = [("video" if d.frames else "image", d.height, d.width, d.frames)] if d.height and d.width else []
        else:
            allowed = request.allowed_modalities if request.allowed_modalities is not None else list(
                self.manifest.outputs)
            sizes = []
            for modality in allowed:
                if modality in self.manifest.outputs:
                    defaults = self.manifest.outputs[modality].decoder.defaults
                    sizes.append((modality, d.height or defaults.height, d.width or defaults.width,
                                  d.frames or defaults.frames))
        for modality, height, width, frames in sizes:
            if decode_pixels(modality, height, width, frames) > self.max_decode_pixels:
                hint = "" if request.allowed_modalities is not None else \
                    f"; the reply may make any modality: allowed_modalities can leave {modality} out"
                raise InvalidRequestError(
                    f"decoder: {describe_size(modality, height, width, frames)} exceeds the budget of "
                    f"{self.max_decode_pixels} pixels per item (NEXTGPT_DECODERS__MAX_PIXELS_PER_JOB){hint}",
                    code="decode_too_large", param="decoder")

    async def _encode_history(self, conversation: Conversation) -> None:
        """Generated media of earlier replies go through the encoder once, when the next turn needs them. Media
        still being decoded when their reply was saved join it here once their job has completed; running ones
        stay pending (this turn sees the reply without them), failed or forgotten ones are dropped."""
        for turn in conversation.turns:
            still: list[str] = []
            for job_id in turn.pending_jobs:
                status = await self.decoders.status(job_id)
                if status is not None and status.state == "completed" and status.artifact is not None:
                    turn.artifact_keys.append(status.artifact.key)
                elif status is not None and status.state not in ("failed", "cancelled"):
                    still.append(job_id)
            turn.pending_jobs = still
        await self._encode_generated(conversation.turns)

    async def _encode_generated(self, turns: list[StoredTurn], checked: set[str] | None = None) -> None:
        """The turns' generated media (artifact keys) through the encoder together; each turn's vectors follow
        its own. Media past their retention are gone from the store: a turn keeps its words without them.
        ``checked``: keys just found in the store (a user's artifacts), not asked about again."""
        checked = checked or set()
        stored = checked | await self._stored(k for turn in turns for k in turn.artifact_keys if k not in checked)
        kept = {id(turn): [k for k in turn.artifact_keys if k in stored] for turn in turns if turn.artifact_keys}
        keys = list(dict.fromkeys(k for found in kept.values() for k in found))
        by_key = dict(zip(keys, await self._encode([MediaInput(name=k, key=k) for k in keys]), strict=True))
        for turn in turns:
            turn.vectors.extend(by_key[k] for k in kept.get(id(turn), []))
            turn.artifact_keys = []

    async def _stored(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` the store still holds, asked all at once (in distributed mode each is an S3 HEAD: a
        history's sixteen pictures one after the other would be sixteen round trips)."""
        unique = list(dict.fromkeys(keys))
        found = await asyncio.gather(*(asyncio.to_thread(self.store.exists, k) for k in unique))
        return {k for k, present in zip(unique, found, strict=True) if present}

    async def _encode(self, items: list[MediaInput]) -> list[np.ndarray]:
        """Embeddings of ``items``, in calls within the encoder's bound on items per call."""
        out: list[np.ndarray] = []
        for at in range(0, len(items), self.encode_batch):
            out.extend((await self.encoder.encode(items[at:at + self.encode_batch])).embeddings)
        return out

    async def _artifact_keys(self, index: int, message: ChatMessage) -> list[str]:
        """The artifact keys of a message's ``artifacts`` (see ``ChatMessage``): a user's must be URLs this server
        signed, of media still stored; an assistant's history keeps those that are."""
        keys: dict[str, str] = {}  # where -> key
        for j, url in enumerate(message.artifacts):
            key = self.refs.key(url) if self.refs is not None else None
            where = f"messages[{index}].artifacts[{j}]"
            if key is not None:
                keys[where] = key
            elif message.role == "assistant":  # history from elsewhere, or signed before the signing key changed
                log.info("left out %s: not an artifact URL this server signed", where)
            else:
                raise InvalidRequestError(f"{where}: not an artifact URL this server gave out",
                                          code="invalid_artifact_url", param=where)
        if message.role == "user" and keys:  # the question's subject: one that is gone is an error
            stored = await self._stored(keys.values())
            gone = next((where for where, key in keys.items() if key not in stored), None)
            if gone is not None:
                raise NotFoundError(f"{gone}: the artifact is gone (past its retention)", code="artifact_not_found",
                                    param=gone)
        return list(keys.values())

    async def run(self, request: ChatRequest, conversation: Conversation, params: GenerateParams,
                  media: np.ndarray | None, url_for: Callable[[str], str], owner: str | None,
                  keep_jobs: Callable[[], bool] = lambda: False,
                  stopping: asyncio.Event | None = None) -> AsyncIterator[TurnEvent]:
        """Events of the turn; closing it early cancels the generation and, unless ``keep_jobs()`` says so when
        it closes (a non-streaming caller that stops waiting, its client still there to poll the jobs), the decode
        jobs.

        ``stopping``: set when the server's stop grace is over. A turn whose text is not kept yet then ends with
        ``server_stopping`` (nothing of it was kept: send it again), its generation and jobs cancelled. One whose
        text is kept, its media made by workers that go on without this process (distributed mode), ends at once
        with ``done``, ``finish_reason`` ``media_pending``, as one that outlasts ``wait_s``: its jobs go on,
        followed at ``/v1/jobs/{id}``, and join the conversation when done; telling its client to send it again
        would add the turn twice. (Embedded, the jobs and the conversation end with the process: send it again.)"""
        started = time.perf_counter()
        out: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        state = _Turn()
        followers: dict[str, asyncio.Task[None]] = {}
        handed_over = stopped = False

        async def on_stop(event: asyncio.Event) -> None:
            await event.wait()
            await out.put(("stop", None))

        async def pump_llm() -> None:
            stream = self.llm.generate(params, media)
            try:
                async for event in stream:
                    await out.put(("llm", event))
            except Exception as exc:
                if isinstance(exc, NextGPTError) and exc.param == "turns":
                    exc.param = "messages"  # the LLM service's name for what this API calls messages
                await out.put(("llm_error", exc))
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
                await out.put(("llm_end", None))

        async def follow(job_id: str) -> None:
            try:
                async for event in self.decoders.events(job_id):
                    await out.put(("job", event))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the job goes on; this stream can no longer follow it
                log.exception("lost the events of job %s", job_id)
                await out.put(("job", JobEvent(job_id=job_id, type="failed",
                                               error=f"lost track of the job: {type(exc).__name__}")))
            finally:
                await out.put(("job_end", job_id))

        async def dispatch(job_id: str, signal: SignalEvent) -> None:
            error: Exception | None = None
            try:
                await self._dispatch(job_id, signal, request, owner)
            except Exception as exc:
                error = exc
            await out.put(("dispatched", (job_id, signal.index, error)))

        llm_task = asyncio.create_task(pump_llm())
        stop_task = asyncio.create_task(on_stop(stopping)) if stopping is not None else None
        # A signal's job is dispatched (its conditioning put in the store, the job sent to the queue) in a task of
        # its own: the words go on meanwhile, where a store slow to answer held them for its timeouts (seconds),
        # and the turn's groups go out side by side. The reply is kept once its jobs are all dispatched.
        dispatching: dict[str, asyncio.Task[None]] = {}
        llm_running, first_token_ms = True, None
        try:
            while llm_running or followers or dispatching:
                kind, item = await out.get()
                if kind == "stop":
                    stopped = True
                    if not (state.kept and self.decoders.outlives_process):
                        raise server_stopping()
                    handed_over = True
                    yield self._done(conversation, state, "media_pending", first_token_ms, started)
                    return
                if kind == "llm" and isinstance(item, Accepted):
                    yield ReplyAccepted(item.prompt_tokens)
                elif kind == "llm":
                    if first_token_ms is None:
                        first_token_ms = round((time.perf_counter() - started) * 1000, 2)
                        if self.metrics is not None:
                            self.metrics.ttft.observe(first_token_ms / 1000)
                    if isinstance(item, TextDelta):
                        state.text.append(item.text)
                        yield MessageDelta(item.text)
                    elif isinstance(item, SignalEvent):
                        yield SignalChosen(item.modality, item.index, item.forced)
                        job_id = new_job_id()
                        # In the turn's artifacts in the order of its signals, whatever order they are queued in.
                        state.artifacts[job_id] = ArtifactOut(job_id=job_id, modality=item.modality, state="queued")
                        dispatching[job_id] = asyncio.create_task(dispatch(job_id, item),
                                                                  name=f"decode-dispatch-{job_id}")
                    elif isinstance(item, Done):
                        state.done = item
                elif kind == "llm_error":
                    raise item
                elif kind == "llm_end":
                    llm_running = False
                elif kind == "dispatched":
                    job_id, index, error = item
                    dispatching.pop(job_id)
                    queued = self._queued(job_id, index, error, state)
                    if isinstance(queued, ArtifactQueued):
                        followers[job_id] = asyncio.create_task(follow(job_id))
                    yield queued
                elif kind == "job":
                    translated = self._job_event(item, state, url_for)
                    if self.metrics is not None and item.type in ("completed", "failed", "cancelled"):
                        self.metrics.artifacts.labels(state.artifacts[item.job_id].modality, item.type).inc()
                    if translated is not None:
                        if isinstance(translated, ArtifactCompleted) and request.inline_media:
                            translated = await self._inline(item, state)
                        yield translated
                elif kind == "job_end":
                    followers.pop(item, None)
                if state.done is not None and not (llm_running or dispatching or state.kept):
                    # The turn is saved as soon as its text is complete and its media queued: a follow-up may
                    # start at once.
                    await self._remember(conversation, state)
                    state.kept = True
                    yield TextComplete(state.done.finish_reason, state.done.prompt_tokens,
                                       state.done.completion_tokens, {
                                           "ttft_ms": first_token_ms or 0.0,
                                           "text_ms": round((time.perf_counter() - started) * 1000, 2),
                                           "llm_ttft_ms": state.done.timings.get("ttft_ms", 0.0)})
            assert state.done is not None
            yield self._done(conversation, state, state.done.finish_reason, first_token_ms, started)
        finally:
            llm_task.cancel()
            if stop_task is not None:
                stop_task.cancel()
            for job_id, task in dispatching.items():
                # Not queued yet: nobody has been told of it. Its task may be past the point where cancelling it
                # stops the job being sent; the job's cancel flag then keeps a worker from running it.
                task.cancel()
                with contextlib.suppress(Exception):
                    await self.decoders.cancel(job_id)
            keep = handed_over or (not stopped and keep_jobs())
            for job_id, task in followers.items():
                task.cancel()
                if not keep:
                    with contextlib.suppress(Exception):
                        await self.decoders.cancel(job_id)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await llm_task

    @staticmethod
    def _done(conversation: Conversation, state: _Turn, finish_reason: str, first_token_ms: float | None,
              started: float) -> TurnDone:
        done = state.done
        assert done is not None
        return TurnDone(
            conversation_id=conversation.id, finish_reason=finish_reason, text="".join(state.text),
            usage={"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
            # The bytes went out once, in artifact.completed.
            artifacts=[a.model_dump(exclude={"data"}) for a in state.artifacts.values()],
            timings={"ttft_ms": first_token_ms or 0.0, "total_ms": round((time.perf_counter() - started) * 1000, 2),
                     "llm_ttft_ms": done.timings.get("ttft_ms", 0.0)})

    def _queued(self, job_id: str, index: int, error: Exception | None,
                state: _Turn) -> ArtifactQueued | ArtifactFailed:
        """The event of a signal's dispatched job: queued, or, where it could not be (the decoder queue is full,
        the store or the broker is down), that item alone failed: the words and the turn's other media go on."""
        artifact = state.artifacts[job_id]
        if error is None:
            return ArtifactQueued(job_id, artifact.modality, index)
        if not isinstance(error, NextGPTError):
            log.error("could not queue the %s job %s", artifact.modality, job_id, exc_info=error)
        artifact.state = "failed"
        artifact.error = f"{error.code}: {error.message}" if isinstance(error, NextGPTError) else \
            f"could not queue the job ({type(error).__name__})"
        if self.metrics is not None:
            self.metrics.artifacts.labels(artifact.modality, "failed").inc()
        return ArtifactFailed(job_id, artifact.modality, artifact.error)

    async def _dispatch(self, job_id: str, signal: SignalEvent, request: ChatRequest, owner: str | None) -> None:
        blob = save({CONDITIONING_TENSOR: np.ascontiguousarray(signal.conditioning, dtype=np.float32)[None]})
        cond = await asyncio.to_thread(self.store.put, new_key("conditioning", ".safetensors", uid=job_id), blob,
                                       "application/vnd.nextgpt.safetensors")
        suffix, _ = ARTIFACT_FORMATS[signal.modality]
        options = request.decoder
        if options.seed is None and request.seed is not None:
            # A seeded turn is reproducible end to end: the n-th item's noise follows from the turn's seed, not
            # from a random job id (an explicit decoder.seed still wins).
            options = options.model_copy(update={"seed": (request.seed * 1009 + signal.index) % 2**63})
        job = DecodeJob(job_id=job_id, modality=signal.modality, conditioning_key=cond.key,
                        artifact_key=new_key(signal.modality, suffix, uid=job_id), options=options, owner=owner)
        try:
            await self.decoders.submit(job)
        except Exception:
            with contextlib.suppress(Exception):  # no job will read it (retention would sweep it later)
                await asyncio.to_thread(self.store.delete, cond.key)
            raise

    @staticmethod
    def _job_event(event: JobEvent, state: _Turn, url_for: Callable[[str], str]) -> TurnEvent | None:
        artifact = state.artifacts[event.job_id]
        if event.type == "progress":
            artifact.state = "running"
            return ArtifactProgress(event.job_id, event.step, event.total)
        if event.type == "completed" and event.artifact is not None:
            artifact.state, artifact.mime, artifact.bytes = "completed", event.artifact.mime, event.artifact.bytes
            artifact.url = url_for(event.artifact.key)
            state.keys.append(event.artifact.key)
            return ArtifactCompleted(artifact.model_copy())
        if event.type in ("failed", "cancelled"):
            artifact.state, artifact.error = event.type, event.error
            return ArtifactFailed(event.job_id, artifact.modality, event.error or event.type)
        return None

    async def _inline(self, event: JobEvent, state: _Turn) -> ArtifactCompleted:
        """The artifact's bytes in the event (and in ``done``), when small enough; else the URL alone and why."""
        assert event.artifact is not None
        artifact = state.artifacts[event.job_id]
        if event.artifact.bytes > self.inline_max_bytes:
            artifact.error = (f"too large to inline ({event.artifact.bytes} > {self.inline_max_bytes} bytes): "
                              "use the url")
        else:
            try:
                blob = await asyncio.to_thread(self.store.read, event.artifact.key)
            except ServiceUnavailableError as exc:  # the artifact is made: its URL serves it once the store is back
                artifact.error = f"{exc.code}: its bytes could not be read to inline them; use the url"
            else:
                artifact.data = base64.b64encode(blob).decode()
        return ArtifactCompleted(artifact.model_copy())

    async def _remember(self, conversation: Conversation, state: _Turn) -> None:
        pending = [job_id for job_id, a in state.artifacts.items() if a.state in ("queued", "running")]
        conversation.turns.append(StoredTurn("assistant", "".join(state.text), artifact_keys=list(state.keys),
                                             pending_jobs=pending))
        await self.conversations.save(conversation)


def _media_window(turns: list[StoredTurn], kept: int, max_media: int) -> int:
    """Where the turns sent to the LLM start: the earliest user turn of the kept conversation (its first ``kept``
    turns) from which the media items number at most ``max_media``; the request's own first turn if none (its own
    media beyond the bound are the LLM service's to refuse)."""
    starts = prompt_starts([t.role for t in turns], kept)
    after = [sum(len(t.vectors) for t in turns[i:]) for i in starts]
    return next((i for i, n in zip(starts, after, strict=True) if n <= max_media), kept)


def _newest_fit(made: list[list[str]], messages: list[ChatMessage], room: int) -> list[list[str]]:
    """Assistant messages' media past ``room`` (what the LLM takes per request beside the user's own media) are
    left out, oldest first: a stateless client's long history keeps its newest pictures, where taking them all
    would put the request over the LLM's bound and refuse it."""
    out = [list(keys) for keys in made]
    for keys, message in zip(reversed(out), reversed(messages), strict=True):
        if message.role == "assistant":
            keep = max(0, min(len(keys), room))
            del keys[:len(keys) - keep]
            room -= keep
    return out


def _flatten(stored: list[StoredTurn]) -> tuple[list[Turn], np.ndarray | None]:
    turns: list[Turn] = []
    vectors: list[np.ndarray] = []
    for turn in stored:
        indices = list(range(len(vectors), len(vectors) + len(turn.vectors)))
        vectors.extend(turn.vectors)
        turns.append(Turn(role=turn.role, text=turn.text, media=indices))  # type: ignore[arg-type]
    return turns, (np.stack(vectors).astype(np.float32) if vectors else None)

