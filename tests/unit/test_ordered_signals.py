"""The vLLM backend computes signal groups beside the text stream: they still go out in their order, all before
the reply ends, and a failed one fails the reply."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from services.contracts.llm import SignalEvent
from services.llm.vllm_backend import _OrderedSignals


def _event(index: int, delay: float, fail: bool = False) -> SignalEvent:
    time.sleep(delay)
    if fail:
        raise RuntimeError(f"group {index} failed")
    return SignalEvent(modality="image", index=index, conditioning=np.zeros(1, np.float32))


def test_groups_go_out_in_order_however_long_each_takes() -> None:
    emitted: list[int] = []
    with ThreadPoolExecutor(4) as pool:
        groups = _OrderedSignals(lambda e: emitted.append(e.index))  # type: ignore[attr-defined]
        for index, delay in enumerate((0.3, 0.0, 0.1, 0.0)):
            groups.submit(pool, lambda i=index, d=delay: _event(i, d))
        assert emitted == []  # nothing waits for them: the caller goes on streaming
        groups.wait()
    assert emitted == [0, 1, 2, 3]


def test_a_failed_group_fails_the_reply_after_the_others() -> None:
    emitted: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        groups = _OrderedSignals(lambda e: emitted.append(e.index))  # type: ignore[attr-defined]
        groups.submit(pool, lambda: _event(0, 0.05, fail=True))
        groups.submit(pool, lambda: _event(1, 0.0))
        with pytest.raises(RuntimeError, match="group 0 failed"):
            groups.wait()
    assert emitted == [1]
