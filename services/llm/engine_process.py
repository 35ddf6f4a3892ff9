"""The transformers backend's batch engine in a process of its own.

Decoding a running batch is Python work between small tensor ops: in the serving process it holds the
interpreter lock about half the time, and the HTTP event loop waits on it (measured with py-spy: that wait is
what made time to first token grow with concurrency). As vLLM splits its API server from its engine core, the
engine here lives in a child process: the serving process only forwards requests and events.

Parent -> child: ``("generate", rid, params, media)``, ``("cancel", rid)``, ``("close",)``.
Child -> parent: lists of ``("event", rid, event)`` / ``("end", rid, error)``; one message carries every event
that piled up while the last one was being sent, so a busy engine sends fewer, larger messages.

A child that dies fails every generation in flight and every later one with 503 ``llm_engine_exited``.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from services.contracts.errors import NextGPTError, ServiceUnavailableError
from services.contracts.llm import GenerateParams
from services.runtime import children
from services.runtime.heap import freeze_loaded

log = logging.getLogger(__name__)

# How often a waiting generation looks at its cancel flag (a cancelled reply leaves the batch at its next step
# after this).
_CANCEL_POLL_S = 0.02


@dataclass(frozen=True)
class EngineSpec:
    """What the child needs to build the backend (a bundle path, not a loaded bundle: it loads its own)."""

    bundle: Path
    device: str
    dtype: str
    max_prompt_tokens: int | None
    max_batch: int
    max_requests: int  # generations the child runs at once: the batch plus those waiting for a row
    threads: int | None = None  # torch threads in the child (None: torch's default)
    cpus: tuple[int, ...] | None = None  # the CPUs the child runs on (None: unbound)


@dataclass
class _Pending:
    emit: Any
    finished: threading.Event
    error: BaseException | None = None


def _portable(exc: BaseException) -> tuple[str, Any]:
    """Errors cross the pipe as data: ``NextGPTError``s keep their class, code and param; others become 500s."""
    if isinstance(exc, NextGPTError):
        return "nextgpt", (type(exc), exc.message, exc.code, exc.param)
    return "other", f"{type(exc).__name__}: {exc}"


def _restore(error: tuple[str, Any]) -> BaseException:
    kind, data = error
    if kind == "nextgpt":
        cls, message, code, param = data
        return cls(message, code=code, param=param)
    return RuntimeError(f"LLM engine: {data}")


class EngineProcess:
    """A ``Backend`` whose generations run in a child process (see the module doc)."""

    def __init__(self, spec: EngineSpec, start_timeout_s: float = 600.0,
                 on_exit: Callable[[str], None] | None = None, stall_s: float = 300.0) -> None:
        """``on_exit(reason)`` runs (on the reader thread) when the child dies while it should be serving.
        ``stall_s``: a child that sends nothing that long while generations are under way is taken as hung (a
        step takes milliseconds to seconds; each sends events) and killed, which fails them like a crash: a hung
        engine would otherwise hold every slot while the server still looked ready."""
        self._conn, child_conn = multiprocessing.Pipe()
        self._process = children.start(_child_main, (child_conn, spec), "llm-engine")
        child_conn.close()
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count()
        self._dead: str | None = None
        self._closing = False
        self._on_exit = on_exit
        self._stall_s, self._hung = stall_s, False
        self._heard = time.monotonic()  # the child's last message, or the start of a wait for one
        if not self._conn.poll(start_timeout_s):
            self._process.kill()
            raise RuntimeError(f"the LLM engine process did not start within {start_timeout_s:.0f} s")
        try:
            first = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError(f"the LLM engine process exited while starting (code {self._process.exitcode})")
        if first[0] != "ready":
            self._process.join(5)
            raise RuntimeError(f"the LLM engine process failed to start: {first[1]}")
        self.threads: int = first[1]  # what its torch runs on (EngineSpec.threads, else torch's default)
        self.cpus: list[int] = first[2]  # the CPUs it may run on (EngineSpec.cpus, else all this process may)
        log.info("LLM engine process %d ready (%s, torch threads %d, CPUs %s%s)", self._process.pid, spec.device,
                 self.threads, ",".join(map(str, self.cpus)), "" if spec.cpus else ", unbound")
        self._reader = threading.Thread(target=self._read, name="llm-engine-reader", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self._dead is None and self._process.is_alive()

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    def generate(self, params: GenerateParams, media: np.ndarray | None, emit: Any,
                 cancelled: threading.Event) -> None:
        self.check_alive()
        rid = next(self._ids)
        pending = _Pending(emit, threading.Event())
        with self._pending_lock:
            if not self._pending:  # the engine was idle: its silence until now says nothing
                self._heard = time.monotonic()
            self._pending[rid] = pending
        try:
            self._send(("generate", rid, params, media))
            cancel_sent = False
            while not pending.finished.wait(_CANCEL_POLL_S):
                if cancelled.is_set() and not cancel_sent:
                    self._send(("cancel", rid))
                    cancel_sent = True
        except (BrokenPipeError, OSError) as exc:
            raise ServiceUnavailableError(f"the LLM engine process is gone: {exc}", code="llm_engine_exited") from exc
        finally:
            with self._pending_lock:
                self._pending.pop(rid, None)
        if pending.error is not None:
            raise pending.error

    def _stalled(self) -> bool:
        with self._pending_lock:
            waiting = bool(self._pending)
        return waiting and time.monotonic() - self._heard > self._stall_s

    def _read(self) -> None:
        try:
            while True:
                if not self._conn.poll(min(1.0, self._stall_s / 4)):
                    if self._stalled() and self._process.is_alive():
                        log.error("the LLM engine process sent nothing for %.0f s with generations under way: "
                                  "killing it as hung", self._stall_s)
                        self._hung = True
                        self._process.kill()  # the pipe closes: handled below as a crash
                    continue
                self._heard = time.monotonic()
                for kind, rid, payload in self._conn.recv():
                    with self._pending_lock:
                        pending = self._pending.get(rid)
                    if pending is None:
                        continue
                    if kind == "event":
                        pending.emit(payload)
                    else:
                        pending.error = _restore(payload) if payload is not None else None
                        pending.finished.set()
        except (EOFError, OSError):
            pass
        self._process.join(5)
        self._dead = f"hung for {self._stall_s:.0f} s, killed" if self._hung else f"exit code {self._process.exitcode}"
        with self._pending_lock:
            pending_now = list(self._pending.values())
        for pending in pending_now:
            pending.error = ServiceUnavailableError(f"the LLM engine process exited ({self._dead})",
                                                    code="llm_engine_exited")
            pending.finished.set()
        if not self._closing and not children.exiting():
            log.error("the LLM engine process exited unexpectedly (%s)", self._dead)
            if self._on_exit is not None:
                self._on_exit(self._dead)

    def check_alive(self) -> None:
        if not self.alive:
            raise ServiceUnavailableError(f"the LLM engine process exited ({self._dead})", code="llm_engine_exited")

    def close(self) -> None:
        self._closing = True
        if self._process.is_alive():
            try:
                self._send(("close",))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)


# -- the child ------------------------------------------------------------------------------------------------
def _child_main(conn: Connection, spec: EngineSpec) -> None:
    # The parent ends this process (a close once its server has finished its replies, a kill, or the pipe's end
    # when the parent is gone). A SIGTERM sent to the whole process group (systemd stops a service so) or a Ctrl-C
    # must not end it first: the replies under way, which a graceful shutdown lets finish, failed with
    # llm_engine_exited, and the server logged a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if spec.cpus:  # first, so that the threads made from here on (torch's OpenMP team included) inherit it
        for thread in os.listdir("/proc/self/task"):  # and those the imports may have started
            os.sched_setaffinity(int(thread), spec.cpus)
    import torch

    from services.bundle.loader import load_bundle
    from services.llm.hf_backend import HFBackend

    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        backend = HFBackend(load_bundle(spec.bundle), spec.device, getattr(torch, spec.dtype), spec.max_prompt_tokens,
                            spec.max_batch)
    except BaseException as exc:  # reported to the parent, which raises it at start-up
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    freeze_loaded()  # the model and the imports: the decode loop's full collections then skip them
    outbox: queue.SimpleQueue[tuple[str, int, Any] | None] = queue.SimpleQueue()
    sender = threading.Thread(target=_send_batches, args=(conn, outbox), name="llm-engine-sender", daemon=True)
    conn.send(("ready", torch.get_num_threads(), sorted(os.sched_getaffinity(0))))
    sender.start()
    cancels: dict[int, threading.Event] = {}
    lock = threading.Lock()

    def run(rid: int, params: GenerateParams, media: np.ndarray | None, cancelled: threading.Event) -> None:
        error: tuple[str, Any] | None = None
        try:
            backend.generate(params, media, lambda event: outbox.put(("event", rid, event)), cancelled)
        except BaseException as exc:  # every error reaches the request it belongs to
            error = _portable(exc)
        finally:
            with lock:
                cancels.pop(rid, None)
            outbox.put(("end", rid, error))

    with ThreadPoolExecutor(max_workers=spec.max_requests, thread_name_prefix="llm-request") as pool:
        try:
            while True:
                message = conn.recv()
                if message[0] == "generate":
                    _, rid, params, media = message
                    cancelled = threading.Event()
                    with lock:
                        cancels[rid] = cancelled
                    pool.submit(run, rid, params, media, cancelled)
                elif message[0] == "cancel":
                    with lock:
                        found = cancels.get(message[1])
                    if found is not None:
                        found.set()
                else:
                    break
        except (EOFError, OSError):  # the parent is gone: stop every generation
            pass
        with lock:
            for cancelled in cancels.values():
                cancelled.set()
    backend.close()
    outbox.put(None)
    sender.join(5)


def _send_batches(conn: Connection, outbox: queue.SimpleQueue[tuple[str, int, Any] | None]) -> None:
    while True:
        first = outbox.get()
        if first is None:
            return
        batch = [first]
        while True:  # everything that piled up goes in one message
            try:
                item = outbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                conn.send(batch)
                return
            batch.append(item)
        try:
            conn.send(batch)
        except (BrokenPipeError, OSError):
            return

