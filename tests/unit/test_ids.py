from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from services.contracts.chat import ChatRequest
from services.contracts.decoders import DecodeJob
from services.contracts.ids import is_hex_id

# Fixed, not drawn per run: the parameters' ids must be the same in every collecting process (pytest-xdist).
GOOD = uuid.UUID(int=0x0123456789ABCDEF0123456789ABCDEF).hex


@pytest.mark.parametrize("value", ["", GOOD.upper(), GOOD[:-1], GOOD + "0", GOOD + "\n", " " + GOOD, "../" + GOOD[3:]])
def test_only_the_ids_this_server_makes_pass(value: str) -> None:
    assert is_hex_id(GOOD) and not is_hex_id(value)


def test_a_job_and_a_conversation_take_the_same_ids() -> None:
    job = {"job_id": GOOD, "modality": "image", "conditioning_key": f"conditioning/2026/12/05/{GOOD}.safetensors",
           "artifact_key": f"image/2026/12/05/{GOOD}.png"}
    assert DecodeJob(**job).job_id == GOOD
    with pytest.raises(ValidationError, match="job_id"):  # re's "$" also matched before a final newline
        DecodeJob(**{**job, "job_id": GOOD + "\n"})
    assert ChatRequest(messages=[{"role": "user", "content": "hi"}], conversation_id=GOOD).conversation_id == GOOD
    with pytest.raises(ValidationError, match="conversation_id"):
        ChatRequest(messages=[{"role": "user", "content": "hi"}], conversation_id=GOOD + "\n")
