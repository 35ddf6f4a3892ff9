"""Whether the LLM has generations under way, for whoever shares the machine with it and adapts to it (the
embedded decoder process takes fewer threads while the LLM's engine holds a core)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


class Activity:
    """Counts generations under way and tells its listeners when that goes from none to some (``True``) and back
    (``False``). Listeners run on the thread whose generation started or ended, in the order the changes
    happened, and must be quick (they run under this object's lock). A listener that fails is logged: it never
    fails the generation that made the change."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def busy(self) -> bool:
        return self._count > 0

    def subscribe(self, listener: Callable[[bool], None]) -> None:
        with self._lock:
            self._listeners.append(listener)
            self._tell(listener, self._count > 0)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self._change(1)
        try:
            yield
        finally:
            self._change(-1)

    def _change(self, delta: int) -> None:
        with self._lock:
            was = self._count > 0
            self._count += delta
            if (self._count > 0) != was:
                for listener in self._listeners:
                    self._tell(listener, not was)

    @staticmethod
    def _tell(listener: Callable[[bool], None], busy: bool) -> None:
        try:
            listener(busy)
        except Exception:
            log.exception("an LLM activity listener failed")
