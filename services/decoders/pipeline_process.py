"""The decoder pool's diffusers pipelines in a process of their own (the embedded pool's, and a Celery worker's).

In the serving process the decode thread is one of several threads that run torch (the encoder's model thread, the
projectors, the process's start-up): each has its own OpenMP team, and once a process holds more OpenMP threads than
cores, libgomp stops spin-waiting and every parallel op wakes its helpers through the kernel. Measured on the world
bundle on 2 cores (``make bench-decoders``): one picture at a time, the pool made 2.12x the pictures per minute with
its pipelines in a child process, whose one torch thread has the only team, as on its decode thread
(``OMP_WAIT_POLICY=ACTIVE`` does not lift the slowdown). A child also keeps a decoder crash (a segfault, the OOM
killer) from taking the server or the worker: the call fails, and the next one starts a fresh child. And only a
child can have a step stopped: in-process, a step of many minutes (a CPU near the pixel budget) holds a Celery
worker, cancels and all, until it ends.

``PipelineProcess`` stands in for ``DecoderPipelines`` (``generate_batch`` with the same arguments and results); the
runner, the job book, leases, encoding and storage stay in the serving process. One call at a time.

Parent -> child: ``("generate", modality, conditioning, seeds, opts)``, ``("stop",)``, ``("close",)``.
Child -> parent: ``("ready", torch threads)`` / ``("failed", message)`` once; per call ``("step", step, total,
torch threads)`` after every step (the threads it takes next, see ``set_contended``), then ``("done", results)``,
``("error", exception)`` or ``("stopped",)``. The child never waits for the parent between steps (a serving
process busy with its event loop would slow every step); it looks for a stop after each one, so a cancelled call
ends one step after the parent asked; while a step runs, the parent asks the runner's ``check`` every ``_POLL_S``
(a cancel mid-step). A step is not interrupted, so a child that has not stopped ``STOP_GRACE_S`` after the parent
asked, or whose call runs past ``call_limit_s`` (the runner's time limit) plus that grace with no step ending, is
killed: a step of many minutes (a size within the pixel budget that the CPU takes that long over) then holds the
pool that long, not until it ends. A new child starts loading at once.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import pickle
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.bundle.loader import Bundle
from services.contracts.bundle_manifest import Modality
from services.contracts.errors import ServiceUnavailableError
from services.decoders.pipelines import CallTimeLimitError, Generated, ResolvedOptions, StepCallback, StopCheck
from services.runtime import children
from services.runtime.heap import freeze_loaded

log = logging.getLogger(__name__)

# How often a waiting call looks whether the child still lives (a child killed mid-step sends nothing more).
_POLL_S = 1.0
# How long a child may take to stop once asked (cancel, time limit, shutdown), or to end a step once the call is
# past its time limit, before it is killed: far longer than a step at the sizes it is built for.
STOP_GRACE_S = 10.0
# How long after the LLM's last generation ended the child keeps its contended thread count: a chat's replies
# come with gaps of milliseconds between them, and a step begun with every core's thread just as the next reply
# starts runs 3-4x slower (each parallel region waits for the thread whose core the LLM took).
CONTENDED_HOLD_S = 0.1


class DecoderProcessDied(RuntimeError):
    """The child exited in the middle of a call (a crash: the call's jobs fail; the next call starts a new one)."""


@dataclass(frozen=True)
class PipelineSpec:
    bundle: Path
    modalities: tuple[Modality, ...]
    device: str
    log_level: int  # the serving process's, so the child logs what the server does
    threads: int | None = None  # the child's torch threads (None: torch's default)
    threads_contended: int | None = None  # its threads while the parent says the CPU is contended (None: as above)


class _Stop(Exception):
    """In the child: the parent's step callback said stop (cancelled, timed out, job book away)."""


class PipelineProcess:
    def __init__(self, bundle: Bundle, modalities: list[Modality], device: str = "cpu",
                 start_timeout_s: float = 600.0, call_limit_s: float | None = None,
                 stop_grace_s: float = STOP_GRACE_S, threads: int | None = None,
                 threads_contended: int | None = None, contended_hold_s: float = CONTENDED_HOLD_S) -> None:
        """Starts the child at once and returns; ``wait_ready`` (or the first call) waits for its pipelines.
        ``call_limit_s``: the runner's time limit (None: none here). ``threads``: the child's torch threads (None:
        torch's default). ``threads_contended``: its threads while ``set_contended`` says another process holds
        cores (the LLM engine decoding), from the next step on, and for ``contended_hold_s`` after that ends."""
        self.contended_hold_s = contended_hold_s
        self.bundle = bundle
        self.spec = PipelineSpec(bundle.root, tuple(modalities), device, logging.getLogger().getEffectiveLevel(),
                                 threads, threads_contended)
        # Until when the child runs at threads_contended (time.monotonic(), one clock for both processes on Linux
        # and macOS); shared memory, so that neither side waits on the other between steps.
        self._contended_until = children.context().Value("d", 0.0, lock=False)
        self.start_timeout_s = start_timeout_s
        self.call_limit_s, self.stop_grace_s = call_limit_s, stop_grace_s
        self._lock = threading.Lock()  # one call at a time; also guards (re)starts
        self._process: Any = None
        self._conn: Connection | None = None
        self._ready = False
        self._closed = False
        self.starts = 0
        self.load_error: str | None = None
        # The child's torch threads, as it last reported them (when it loaded, and after each step).
        self.threads: int | None = None
        self._start()

    def _start(self) -> None:
        self._conn, child_conn = multiprocessing.Pipe()
        self._process = children.start(_child_main, (child_conn, self.spec, self._contended_until),
                                       "decoder-pipelines")
        child_conn.close()
        self._ready = False
        self.starts += 1

    def _wait_ready_locked(self) -> Connection:
        assert self._conn is not None
        if self._ready:
            return self._conn
        started = time.monotonic()
        problem: str | None = None
        if not self._conn.poll(self.start_timeout_s):
            self._kill()
            problem = f"the decoder process did not load its pipelines within {self.start_timeout_s:.0f} s"
        else:
            try:
                first = self._conn.recv()
            except (EOFError, OSError):
                first = ("exited",)
            if first[0] != "ready":
                self._process.join(5)
                problem = f"the decoder process failed to load its pipelines: {first[1]}" if first[0] == "failed" \
                    else f"the decoder process exited while loading (code {self._process.exitcode})"
        self.load_error = problem
        if problem is not None:
            raise RuntimeError(problem)
        self._ready = True
        self.threads = first[1]
        log.info("decoder process %d ready (%s) in %.1f s, torch threads %d", self._process.pid,
                 ", ".join(self.spec.modalities), time.monotonic() - started, self.threads)
        return self._conn

    def set_contended(self, busy: bool) -> None:
        """Another process on this machine now holds cores (``True``: the child takes ``threads_contended`` from
        its next step) or no longer does (it goes back to its own ``contended_hold_s`` later). Cheap, any thread."""
        self._contended_until.value = math.inf if busy else time.monotonic() + self.contended_hold_s

    def check_health(self) -> None:
        """For /readyz: the pipelines could not be loaded the last time a child started (each job fails until a
        later start succeeds). A child that died is not a problem yet: the next call starts a new one."""
        if self.load_error is not None:
            raise ServiceUnavailableError(self.load_error, code="decoders_unavailable")

    def wait_ready(self) -> None:
        with self._lock:
            self._wait_ready_locked()

    def generate_batch(self, modality: Modality, conditioning: torch.Tensor, seeds: list[int],
                       opts: ResolvedOptions, on_step: StepCallback,
                       check: StopCheck | None = None) -> list[Generated]:
        """As ``DecoderPipelines.generate_batch``. An exception ``on_step`` raises, or ``check`` (asked every
        ``_POLL_S`` while a step runs), stops the child's call and is raised here once the child has stopped (so
        the next call finds it idle): a cancel mid-step ends the call within the poll and the grace, not a whole
        step later."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the decoder process is closed")
            if not self._process.is_alive():
                log.warning("decoder process gone (exit code %s); starting a new one", self._process.exitcode)
                self._start()
            conn = self._wait_ready_locked()
            try:
                conn.send(("generate", modality, conditioning.detach().cpu().numpy(), list(seeds), opts))
                outcome = self._follow(conn, on_step, check)
            except (EOFError, OSError):  # the pipe broke: the child is gone
                self._process.join(5)
                raise self._died() from None
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _follow(self, conn: Connection, on_step: StepCallback,
                check: StopCheck | None) -> list[Generated] | BaseException:
        """The call's results, or the exception to raise (returned, so that only the pipe's own errors reach the
        caller's ``except``)."""
        stopping: BaseException | None = None
        deadline = None if self.call_limit_s is None else time.monotonic() + self.call_limit_s + self.stop_grace_s
        stop_by = 0.0  # once stopping: when the child is killed if it has not stopped

        def stop(reason: BaseException) -> None:
            nonlocal stopping, stop_by
            stopping, stop_by = reason, time.monotonic() + self.stop_grace_s
            conn.send(("stop",))

        while True:
            while not conn.poll(min(_POLL_S, self.stop_grace_s)):
                if not self._process.is_alive():
                    return self._died()
                if self._closed and stopping is None:  # a step longer than the poll: stop it all the same
                    stop(RuntimeError("the decoder process is shutting down"))
                if check is not None and stopping is None:
                    try:
                        check()
                    except BaseException as exc:
                        stop(exc)
                now = time.monotonic()
                if stopping is not None and now > stop_by:
                    log.warning("decoder process %d did not stop within %.0f s (a step that long); killed, a new "
                                "one starts", self._process.pid, self.stop_grace_s)
                    self._kill_mid_call()
                    return stopping
                if stopping is None and deadline is not None and now > deadline:
                    log.warning("decoder process %d: a step ran past the call's time limit; killed, a new one "
                                "starts", self._process.pid)
                    self._kill_mid_call()
                    return CallTimeLimitError(
                        f"a step ran past the time limit of {self.call_limit_s:.0f} s and was stopped; ask for "
                        f"fewer steps or a smaller size")
            message = conn.recv()
            kind = message[0]
            if kind == "step":
                self.threads = message[3]
                if stopping is not None:
                    continue  # steps the child made before it read the stop
                try:
                    if self._closed:
                        raise RuntimeError("the decoder process is shutting down")
                    on_step(message[1], message[2])
                except BaseException as exc:  # stop the child, then raise it here
                    stop(exc)
            elif stopping is not None:
                # "stopped", or the call's end that crossed the stop (the child drops a stop that finds it idle).
                return stopping
            elif kind == "error":
                error: BaseException = message[1]
                return error
            else:
                results: list[Generated] = message[1]
                return results

    def _died(self) -> Exception:
        code = self._process.exitcode
        self._ready = False
        if code is not None and code < 0 and -code == 9:
            # SIGKILL: on a machine that is not being shut down, almost always the kernel's OOM killer.
            return MemoryError("the decoder process was killed (signal 9: likely out of memory)")
        return DecoderProcessDied(f"the decoder process died during the call (exit code {code})")

    def _kill_mid_call(self) -> None:
        """The child is killed in a call, and a new one starts loading at once (the next call waits for it)."""
        self._kill()
        self._ready = False
        if not self._closed:
            self._start()

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)

    def close(self, timeout_s: float = 30.0) -> None:
        """A call in flight stops at its next step (its jobs fail); then the child exits, or is killed."""
        self._closed = True
        if not self._lock.acquire(timeout=timeout_s):  # a step longer than that: no waiting for it
            self._kill()
            return
        try:
            if self._process.is_alive():
                try:
                    assert self._conn is not None
                    self._conn.send(("close",))
                except (BrokenPipeError, OSError):
                    pass
                self._process.join(10)
            self._kill()
        finally:
            self._lock.release()


# -- the child ------------------------------------------------------------------------------------------------
def _child_main(conn: Connection, spec: PipelineSpec, contended_until: Any) -> None:
    from services.bundle.loader import load_bundle
    from services.decoders.pipelines import DecoderPipelines

    # The parent ends this process (a close, a kill, or its pipe's end when the parent is gone). A Ctrl-C or a
    # SIGTERM sent to the whole process group must not end a call the parent means to finish: a Celery worker's
    # warm shutdown lets its batch end first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level,
                        format="%(asctime)s %(levelname)s %(name)s [decoder-process]: %(message)s")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        pipelines = DecoderPipelines(load_bundle(spec.bundle), list(spec.modalities), spec.device)
    except BaseException as exc:  # reported to the parent, which raises it
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    freeze_loaded()  # the pipelines and the imports: later full collections skip them
    threads = _Threads(torch.get_num_threads(), spec.threads_contended, contended_until)
    conn.send(("ready", threads.own))
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                continue  # sent while the call it was meant for was ending
            if message[0] != "generate":
                return
            _, modality, conditioning, seeds, opts = message
            conn.send(_generate(conn, pipelines, modality, conditioning, seeds, opts, threads))
    except (EOFError, OSError):  # the parent is gone
        return


class _Threads:
    """In the child: its torch threads, switched between steps to ``contended`` while the parent says so."""

    def __init__(self, own: int, contended: int | None, contended_until: Any) -> None:
        self.own, self.contended, self.contended_until = own, contended, contended_until

    def apply(self) -> None:
        if self.contended is None:
            return
        wanted = self.contended if time.monotonic() < self.contended_until.value else self.own
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
            log.debug("torch threads now %d", wanted)


def _generate(conn: Connection, pipelines: Any, modality: Modality, conditioning: np.ndarray, seeds: list[int],
              opts: ResolvedOptions, threads: _Threads) -> tuple[Any, ...]:
    def on_step(step: int, total: int) -> None:
        threads.apply()
        conn.send(("step", step, total, torch.get_num_threads()))
        if conn.poll():  # only a stop comes while a call runs
            conn.recv()
            raise _Stop

    threads.apply()
    try:
        results = pipelines.generate_batch(modality, torch.from_numpy(conditioning), seeds, opts, on_step)
    except _Stop:
        return ("stopped",)
    except Exception as exc:  # the parent classifies it (out of memory, broken device, a bad job)
        return ("error", _portable(exc))
    return ("done", results)


def _portable(exc: Exception) -> Exception:
    """The exception itself when it survives pickling (its class is what the runner classifies by), else its
    text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc
