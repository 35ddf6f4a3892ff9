"""The ``vllm`` backend: generation on a vLLM OpenAI server (pure ``prompt_embeds`` requests, LoRA by model
name), hidden states from the pooler sidecar (teacher-forced prefill).

Signal groups are kept whole without a server plugin: a group's first token is a stop token of the request;
when the model emits it, the rest of the group is appended here (forced, as a logits processor would) and
generation continues from the longer prefix. Non-first signal tokens and disallowed modalities are banned with
``logit_bias``. ``require_modalities`` turns a final stop, or the end of the budget, into the owed group.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from services.bundle.loader import Bundle
from services.clients.errors import error_from_response
from services.contracts.errors import InvalidRequestError, ServiceUnavailableError
from services.contracts.llm import Accepted, Done, GenerateParams, LLMEvent, SignalEvent, TextDelta
from services.llm.embedding_table import load_embedding_table
from services.llm.projectors import Projectors
from services.llm.prompt_embeds import build_prompt_embeddings
from services.llm.signals import Group, SignalController
from services.llm.stop_strings import StopStrings
from services.web.keep_alive import VLLM_CLIENT_IDLE_S

Emit = Callable[[LLMEvent], None]
_BAN = -100.0


class _OrderedSignals:
    """Signal events computed in a pool, emitted in the order their groups were made, as each is ready."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._lock = threading.Lock()
        self._futures: list[Future[SignalEvent]] = []
        self._finished: dict[int, Future[SignalEvent]] = {}
        self._next = 0
        self._all_out = threading.Event()
        self._all_out.set()

    def submit(self, pool: ThreadPoolExecutor, make: Callable[[], SignalEvent]) -> None:
        with self._lock:
            index = len(self._futures)
            self._all_out.clear()
            future = pool.submit(make)
            self._futures.append(future)
        future.add_done_callback(lambda f: self._done(index, f))

    def _done(self, index: int, future: Future[SignalEvent]) -> None:
        with self._lock:
            self._finished[index] = future
            while self._next in self._finished:
                ready = self._finished.pop(self._next)
                self._next += 1
                if ready.exception() is None:
                    self._emit(ready.result())
            if self._next == len(self._futures):
                self._all_out.set()

    def wait(self) -> None:
        self._all_out.wait()
        for future in self._futures:
            future.result()


class _Prompt:
    """A reply's prompt embeddings, the key the pooler keeps them under, and whether it has them yet."""

    def __init__(self, embeds: torch.Tensor) -> None:
        self.embeds = embeds
        self.sent = False

    @functools.cached_property
    def key(self) -> str:  # only replies that make a signal group pay for the digest
        return hashlib.sha256(self.embeds.float().numpy().tobytes()).hexdigest()[:32]


def _b64_tensor(tensor: torch.Tensor) -> str:
    return base64.b64encode(save_tensors({"tensor": tensor.contiguous()})).decode()


def _torch_b64(tensor: torch.Tensor) -> str:
    """vLLM's ``prompt_embeds`` wire format: ``torch.save`` bytes, base64."""
    buf = io.BytesIO()
    torch.save(tensor.contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode()


class VLLMBackend:
    def __init__(self, bundle: Bundle, server_url: str, pooler_url: str, timeout_s: float = 600.0,
                 max_prompt_tokens: int | None = None) -> None:
        from transformers import AutoTokenizer

        self.bundle, self.manifest = bundle, bundle.manifest
        self.server_url, self.pooler_url = server_url.rstrip("/"), pooler_url.rstrip("/")
        self._timeout = httpx.Timeout(timeout_s, connect=5.0)
        # One client per generation thread: threads sharing one client's connection pool were seen to queue
        # behind each other's streams (8 concurrent replies reaching vLLM one or two at a time), which defeats the
        # server's batching.
        self._signals = ThreadPoolExecutor(max_workers=8, thread_name_prefix="vllm-signal")
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._clients_lock = threading.Lock()
        self.tokenizer = AutoTokenizer.from_pretrained(str(bundle.path(self.manifest.llm.path)))
        self.table = load_embedding_table(bundle.path(self.manifest.llm.path))
        self.projectors = Projectors(bundle, torch.device("cpu"))
        self.max_prompt_tokens = max_prompt_tokens or self.manifest.llm.max_model_len
        self.lora_names = [lora.name for lora in self.manifest.llm.loras]

    def close(self) -> None:
        self._signals.shutdown(wait=False, cancel_futures=True)
        with self._clients_lock:
            for client in self._clients:
                client.close()
            self._clients.clear()

    @property
    def http(self) -> httpx.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            # Let go of idle connections before vLLM's server closes them (services/web/keep_alive.py).
            client = self._local.client = httpx.Client(
                timeout=self._timeout, limits=httpx.Limits(keepalive_expiry=VLLM_CLIENT_IDLE_S))
            with self._clients_lock:
                self._clients.append(client)
        return client

    def prompt_embeddings(self, params: GenerateParams, media: np.ndarray | None) -> torch.Tensor:
        return build_prompt_embeddings(self.manifest, lambda t: self.tokenizer.encode(t, add_special_tokens=False),
                                       lambda ids: self.table[ids], params, media, self.max_prompt_tokens)

    def _model(self, lora: str | None) -> str:
        if lora is None:
            return self.manifest.name
        if lora not in self.lora_names:
            raise InvalidRequestError(f"unknown LoRA {lora!r}; available: {self.lora_names}", code="unknown_lora",
                                      param="lora")
        return lora

    def generate(self, params: GenerateParams, media: np.ndarray | None, emit: Emit,
                 cancelled: threading.Event) -> None:
        started = time.perf_counter()
        gen = self.manifest.generation
        lora = params.lora if params.lora is not None else self.manifest.llm.default_lora
        model = self._model(lora)
        max_tokens = params.max_tokens or gen.max_new_tokens
        stop_ids = list(self.manifest.stop.token_ids)
        signals = SignalController(self.manifest, params.allowed_modalities, params.require_modalities,
                                   params.max_signal_groups, stop_ids)
        prompt = _Prompt(self.prompt_embeddings(params, media))
        emit(Accepted(int(prompt.embeds.shape[0])))
        sampling = {
            "temperature": gen.temperature if params.temperature is None else params.temperature,
            "top_p": gen.top_p if params.top_p is None else params.top_p,
            "top_k": (gen.top_k if params.top_k is None else params.top_k) or -1,
        }
        generated: list[int] = []
        first_token_at: float | None = None
        finish = "length"
        request_index = 0

        # A group's conditioning is computed beside the stream (the pooler's prefill), so text keeps flowing; groups
        # go out in their order, all of them before Done.
        groups = _OrderedSignals(emit)

        def append(token: int) -> None:
            position = len(generated)
            generated.append(token)
            group = signals.observe(token, position)
            if group is not None and group.made:
                so_far = list(generated)
                groups.submit(self._signals, lambda g=group, ids=so_far: self._signal(g, prompt, ids, lora))

        def settle(token: int) -> str | None:
            """What a stop or a group's first token becomes (``signals.choose``); the finish reason where the
            reply ends there."""
            chosen = signals.choose(token, max_tokens - len(generated))
            if chosen is None:  # a group that would not fit the budget: the reply ends here
                return "length"
            if chosen in stop_ids:
                generated.append(chosen)
                return "stop"
            append(chosen)
            return None

        stops = StopStrings(params.stop)
        while len(generated) < max_tokens:
            if cancelled.is_set():
                finish = "cancelled"
                break
            decision = signals.decide(max_tokens - len(generated))
            if decision.forced is not None:
                append(decision.forced)
                continue
            if stops.matched:  # the text is over: what the reply still owes, then the stop
                ended = settle(stop_ids[0])
                if ended:
                    finish = ended
                    break
                continue
            owed = sum(len(self.manifest.outputs[m].signal.token_ids) for m in signals.pending())
            body = {
                "model": model, "prompt_embeds": _torch_b64(self._sequence(prompt.embeds, generated)),
                "max_tokens": max(1, max_tokens - len(generated) - owed), "stream": True,
                "stop_token_ids": stop_ids + list(signals.first), "logit_bias": {str(i): _BAN for i in decision.banned},
                "return_token_ids": True, "skip_special_tokens": True, **sampling,
            }
            if params.seed is not None:
                # Each continuation its own, reproducible, draw; wrapped, since vLLM takes seeds up to int64's max
                body["seed"] = (params.seed + request_index) % 2**63
            request_index += 1
            new_ids, reason, stop_reason = self._stream(body, emit, cancelled, stops)
            if new_ids and first_token_at is None:
                first_token_at = time.perf_counter()
            stopped_at = int(stop_reason) if reason == "stop" and isinstance(stop_reason, int) else None
            if stopped_at is not None and new_ids and new_ids[-1] == stopped_at:
                new_ids = new_ids[:-1]  # the stop token or a group's first token: decided below
            for token in new_ids:
                if token not in stop_ids:
                    append(token)
            if reason == "cancelled":
                finish = "cancelled"
                break
            if stops.matched:
                continue
            if stopped_at in stop_ids or stopped_at in signals.first:
                ended = settle(stopped_at)
                if ended:
                    finish = ended
                    break
            elif reason == "length" and not signals.pending() and not signals.in_group:
                finish = "length"
                break
        if stops.matched and finish == "length":  # the stop string came with the budget's last token
            finish = "stop"
        held = stops.flush()  # held back as a possible stop string's start: it was text after all
        if held:
            emit(TextDelta(held))
        groups.wait()  # a failed group fails the reply
        now = time.perf_counter()
        emit(Done(finish_reason=finish, prompt_tokens=int(prompt.embeds.shape[0]), completion_tokens=len(generated),  # type: ignore[arg-type]
                  timings={"ttft_ms": round(((first_token_at or now) - started) * 1000, 2),
                           "total_ms": round((now - started) * 1000, 2)}, token_ids=generated))

    def _sequence(self, prompt: torch.Tensor, generated: list[int]) -> torch.Tensor:
        return torch.cat([prompt, self.table[generated]]) if generated else prompt

    def _stream(self, body: dict[str, object], emit: Emit, cancelled: threading.Event, stops: StopStrings
                ) -> tuple[list[int], str, object]:
        """One vLLM request's tokens, finish reason and stop reason; it is left (vLLM aborts it) on a cancel or
        where its text completes a stop string."""
        ids: list[int] = []
        reason, stop_reason = "length", None
        try:
            with self.http.stream("POST", f"{self.server_url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise error_from_response("vllm", response)
                for line in response.iter_lines():
                    if cancelled.is_set():
                        return ids, "cancelled", None  # leaving the stream closes it: vLLM aborts the request
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    payload = json.loads(line[6:])
                    if "error" in payload:  # vLLM reports failures inside the stream
                        raise ServiceUnavailableError(f"vLLM failed mid-stream: {payload['error']}",
                                                      code="llm_failed")
                    choice = payload["choices"][0]
                    ids.extend(choice.get("token_ids") or [])
                    if choice.get("text"):
                        out = stops.push(choice["text"])
                        if out.text:
                            emit(TextDelta(out.text))
                        if out.matched:
                            return ids, "stop_string", None
                    if choice.get("finish_reason"):
                        reason, stop_reason = choice["finish_reason"], choice.get("stop_reason")
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(f"vLLM server failed: {exc}", code="llm_unavailable") from exc
        return ids, reason, stop_reason

    def _signal(self, group: Group, prompt: _Prompt, generated: list[int], lora: str | None) -> SignalEvent:
        size = len(self.manifest.outputs[group.modality].signal.token_ids)
        first = prompt.embeds.shape[0] + group.start + self.manifest.hidden_state_offset
        states = self.prefill_states(prompt, generated, list(range(first, first + size)), lora)
        conditioning = self.projectors.project(group.modality, states)
        return SignalEvent(modality=group.modality, index=group.index, conditioning=conditioning.numpy(),
                           forced=group.forced)

    def prefill_states(self, prompt: _Prompt, generated: list[int], positions: list[int],
                       lora: str | None) -> torch.Tensor:
        """Last-layer states at ``positions`` of prompt + generated, from the pooler. The prompt's embeddings go
        with the reply's first group only (and again if the pooler has dropped them); then token ids alone."""
        body: dict[str, object] = {"prompt_key": prompt.key, "token_ids": generated, "positions": positions,
                                   "lora": lora}
        for attempt in range(2):
            if not prompt.sent or attempt:
                body["prompt"] = _b64_tensor(prompt.embeds.float())
            try:
                response = self.http.post(f"{self.pooler_url}/v1/states", json=body)
            except httpx.HTTPError as exc:
                raise ServiceUnavailableError(f"vLLM pooler failed: {exc}", code="llm_unavailable") from exc
            if response.status_code != 409:
                break
        if response.status_code != 200:
            raise error_from_response("vllm-pooler", response)
        prompt.sent = True
        return load_tensors(base64.b64decode(response.json()["states"]))["tensor"]
