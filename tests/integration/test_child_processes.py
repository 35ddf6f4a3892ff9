"""``services.runtime.children``: model children fork from one fork server per serving process, which outlives a
SIGTERM to the process group and hands each child the parent's OMP_NUM_THREADS as it is when the child starts; a
parent that exits without closing its children (a forced shutdown) does not wait for them forever."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from services.runtime import children


def _report(conn: Connection) -> None:
    """Sends its parent's pid and its torch threads, then waits for a word and exits with it."""
    import torch

    conn.send((os.getppid(), torch.get_num_threads()))
    code = conn.recv()
    conn.close()
    os._exit(code)


def _start() -> tuple[multiprocessing.process.BaseProcess, Connection, int, int]:
    conn, child_conn = multiprocessing.Pipe()
    process = children.start(_report, (child_conn,), "test-child")
    child_conn.close()
    assert conn.poll(120), "the child did not start"
    parent, threads = conn.recv()
    return process, conn, parent, threads


def test_a_child_is_forked_by_the_fork_server_which_a_sigterm_to_the_group_does_not_end() -> None:
    first, first_conn, server, _ = _start()
    second, second_conn, server_again, _ = _start()
    try:
        assert server != os.getpid() and server == server_again  # one fork server for both
        # systemd, or `kill -- -PGID`: the fork server gets it too, and its children still report to their parent.
        os.kill(server, signal.SIGTERM)
        first_conn.send(3)
        first.join(30)
        assert first.exitcode == 3 and second.is_alive()
    finally:
        second_conn.send(0)
        second.join(30)
    assert second.exitcode == 0


def test_a_child_takes_the_parents_omp_num_threads_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    warm, warm_conn, _, _ = _start()  # the fork server runs before the variable is set, as in a long test session
    warm_conn.send(0)
    warm.join(30)
    wanted = 3 if (os.cpu_count() or 1) != 3 else 2
    monkeypatch.setenv("OMP_NUM_THREADS", str(wanted))
    process, conn, _, threads = _start()
    conn.send(0)
    process.join(30)
    assert threads == wanted


_LEFT_CHILD = textwrap.dedent("""
    import signal, sys, time
    from services.runtime import children

    def deaf():  # as the model children: SIGTERM and Ctrl-C are their parent's to act on
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("started", flush=True)
        time.sleep(600)

    if __name__ == "__main__":
        children._PRELOAD.clear()  # the model libraries' imports are not what this checks
        child = children.start(deaf, (), "deaf")
        while not child.is_alive():
            time.sleep(0.01)
        time.sleep(1)
        print(child.pid, flush=True)
        sys.exit(0)  # exits without closing it, as a server whose shutdown was forced
""")


def test_a_parent_exiting_without_closing_its_children_ends_them_and_does_not_hang(tmp_path: Path) -> None:
    """multiprocessing's exit handler ends daemon children with SIGTERM and waits for each without a bound; a model
    child ignores SIGTERM, so the parent hung at exit (a second Ctrl-C left `nextgpt serve` running forever)."""
    script = tmp_path / "parent.py"
    script.write_text(_LEFT_CHILD)
    root = Path(__file__).parents[2]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    pid = int(done.stdout.split()[-1])
    assert not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
