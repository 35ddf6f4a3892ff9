from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


async def call_hook(hook: Callable[..., Any], *args: Any) -> Any:
    """Call a start/stop/readiness hook that may be a plain function or a coroutine function."""
    result = hook(*args)
    if inspect.isawaitable(result):
        result = await result
    return result
