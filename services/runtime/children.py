"""How the processes that hold models (the LLM engine, the decoder pipelines) start and end: forked from a fork
server that has imported torch, transformers, peft and diffusers once (``services.runtime.child_imports``), not as
fresh interpreters that import them again.

A fresh interpreter spent about 5 s of one core on imports before it loaded a weight (torch 2 s, transformers and
peft 3 s, diffusers' pipelines 1 s more, on this 2-core machine), each time a child started: at a server's
start-up, and again for every replacement (a decoder child killed for a step past its time limit, or crashed; an
engine restarted). Forked from the fork server, a decoder child with the tiny bundle's three pipelines is ready in
0.8 s instead of 8 s. The fork server is one per serving process, started by its first child (or earlier, by
``start_server``); it never runs a torch op or a thread, so a fork of it is as clean as a spawned interpreter (no
OpenMP team, no CUDA context, no locks held by other threads: why the children were never forked from the server
itself).

What a child inherits from the fork server rather than from its parent at that moment: the environment, the
working directory and the standard streams as they were when the fork server started (a serving process sets them
before its first child, so they are the same), and what torch read at its import. ``OMP_NUM_THREADS`` is the one
such setting a child's behaviour depends on, so ``start`` hands the parent's current value to the child, which
applies it.

The model children ignore SIGTERM and SIGINT: their parent ends them (a close, a kill, or their pipe's end when the
parent is gone), after its graceful shutdown has let their work finish. A parent exiting without having closed
them (a forced shutdown) kills them first (``_kill_children_left``)."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit handler now: ours, registered below, runs before it
import os
import signal
import weakref
from collections.abc import Callable
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

_PRELOAD = ["services.runtime.child_imports"]
_started: weakref.WeakSet[BaseProcess] = weakref.WeakSet()
_exiting = False


def context() -> BaseContext:
    """The fork server's context (spawn where there is no fork server: Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # read when the fork server starts (the first child); the same every call
    return ctx


def start_server() -> None:
    """Start the fork server now, not with the first child: a serving process that will start children calls this
    before its own imports, so that the fork server's (about 5 s of one core) run beside them on another core
    instead of after them. Returns at once (the fork server imports in its own process); a no-op where it runs."""
    if context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def start(target: Callable[..., None], args: tuple[Any, ...], name: str) -> BaseProcess:
    """``target(*args)`` in a new daemon child, started and returned."""
    process = context().Process(target=_child_main, args=(target, args, os.environ.get("OMP_NUM_THREADS")),
                                name=name, daemon=True)
    process.start()
    _started.add(process)
    return process


@atexit.register  # after multiprocessing's own (imported above), so it runs first: exit handlers run last-in first-out
def _kill_children_left() -> None:
    """Children still running when their parent exits without having closed them (its shutdown was forced: a
    second Ctrl-C skips the server's shutdown) are killed. A model child ignores SIGTERM (its parent ends it, so
    that a SIGTERM to the process group cannot cut the work a graceful shutdown finishes), and multiprocessing's
    exit handler ends daemon children with SIGTERM, then waits for each without a bound: the parent hung there."""
    global _exiting
    _exiting = True
    for process in list(_started):
        if process.is_alive():
            process.kill()
            process.join(5)


def _child_main(target: Callable[..., None], args: tuple[Any, ...], omp_num_threads: str | None) -> None:
    # The fork server ignores SIGTERM (``child_imports``); a child starts with the default, as a spawned one did,
    # and sets its own.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # ASCII digits only: str.isdigit takes '²', which int() refuses (the child would die before its target ran).
    value = (omp_num_threads or "").strip()
    if value.isascii() and value.isdigit() and int(value) > 0:
        # torch read the variable at its import in the fork server; the parent's value now is what a spawned
        # child would have read.
        import torch

        torch.set_num_threads(int(value))
    target(*args)


def exiting() -> bool:
    """Whether this process is exiting and killing its children: a child's end then is no crash to report."""
    return _exiting
