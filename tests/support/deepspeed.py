"""DeepSpeed for the ZeRO-2 tests: its own environment (`make deepspeed-env`, layered over .venv's packages), the
project's ZeRO-2 config, and the mark that skips a test where that environment was not given."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ZERO2 = Path(__file__).resolve().parents[2] / "deploy" / "training" / "zero2.json"
DEEPSPEED_PYTHON = os.environ.get("NEXTGPT_TEST_DEEPSPEED_PYTHON")
needs_deepspeed = pytest.mark.skipif(not DEEPSPEED_PYTHON,
                                     reason="NEXTGPT_TEST_DEEPSPEED_PYTHON not set (make test sets it)")
