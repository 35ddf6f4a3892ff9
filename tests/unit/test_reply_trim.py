"""A reply's text reaches clients without the whitespace it starts and ends with, however it is split."""

from __future__ import annotations

import random

import numpy as np

from services.contracts.llm import Done, LLMEvent, SignalEvent, TextDelta
from services.llm.reply_trim import ReplyTrim

TEXTS = [" Here is a big red circle.\n", "\n\n  two  spaces,\ta tab and\n\na paragraph \n", "no space", "   ", "",
         " x", "y \n", " Here it is.\n\n"]


def _through(pieces: list[str]) -> list[LLMEvent]:
    out: list[LLMEvent] = []
    trim = ReplyTrim(out.append)
    for piece in pieces:
        trim(TextDelta(piece))
    trim(Done(finish_reason="stop", prompt_tokens=1, completion_tokens=1, timings={}, token_ids=[]))
    return out


def test_the_text_adds_up_to_the_reply_stripped_whatever_its_pieces() -> None:
    rng = random.Random(3)
    for text in TEXTS:
        for _ in range(50):
            cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            out = _through(pieces)
            deltas = [e.text for e in out if isinstance(e, TextDelta)]
            assert "".join(deltas) == text.strip(), (text, pieces)
            assert all(deltas), "no empty delta goes out"
            assert isinstance(out[-1], Done)


def test_inner_whitespace_waits_for_the_text_after_it_and_other_events_keep_their_place() -> None:
    out: list[LLMEvent] = []
    trim = ReplyTrim(out.append)
    signal = SignalEvent(modality="image", index=0, conditioning=np.zeros((1, 1), np.float32), forced=False)
    trim(TextDelta(" Here is"))
    trim(TextDelta(" "))
    assert [e.text for e in out if isinstance(e, TextDelta)] == ["Here is"]  # the space may be the reply's end
    trim(signal)
    trim(TextDelta("more.\n"))
    assert out[1] is signal and out[2] == TextDelta(" more.")
