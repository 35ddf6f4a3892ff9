"""The transformers backend on the committed world bundle: what the reply's words become when the media it would
make may not be made. Asked to draw with no modality allowed, or with a budget that ends where the picture would
start, the reply says what it says when it may draw, and stops there: it does not trail into text the model never
meant to write (masked, the model's next-best token after "Here is a big blue triangle." was " and")."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from services.bundle.loader import load_bundle
from services.contracts.llm import Done, GenerateParams, LLMEvent, SignalEvent, TextDelta, Turn
from services.llm.hf_backend import HFBackend

WORLD_BUNDLE = Path(__file__).parents[2] / "bundles" / "nextgpt-world"


@pytest.fixture(scope="module")
def backend() -> HFBackend:
    return HFBackend(load_bundle(WORLD_BUNDLE))


def _reply(backend: HFBackend, **kw: object) -> tuple[str, list[SignalEvent], Done]:
    events: list[LLMEvent] = []
    params = GenerateParams(turns=[Turn(role="user", text="Draw a blue triangle.")], temperature=0.0, seed=0,
                            **kw)  # type: ignore[arg-type]
    backend.generate(params, None, events.append, threading.Event())
    done = events[-1]
    assert isinstance(done, Done)
    return ("".join(e.text for e in events if isinstance(e, TextDelta)),
            [e for e in events if isinstance(e, SignalEvent)], done)


def test_a_drawing_not_allowed_leaves_the_words_as_they_were(backend: HFBackend) -> None:
    text, signals, done = _reply(backend)
    assert "blue triangle" in text and [s.modality for s in signals] == ["image"] and done.finish_reason == "stop"
    for allowed in ([], ["audio"]):
        text_only, none, done_only = _reply(backend, allowed_modalities=allowed)
        assert (text_only, none, done_only.finish_reason) == (text, [], "stop"), allowed
    # The same once max_signal_groups is used up.
    assert _reply(backend, max_signal_groups=0)[:2] == (text, [])


def test_a_budget_that_ends_at_the_picture_ends_the_reply_there(backend: HFBackend) -> None:
    text, _, done = _reply(backend)
    image = backend.manifest.outputs["image"].signal.token_ids
    start = done.token_ids.index(image[0])
    words = backend.tokenizer.decode(done.token_ids[:start], skip_special_tokens=True)
    for budget in range(start + 1, start + len(image)):  # the group would start but not finish
        cut, signals, cut_done = _reply(backend, max_tokens=budget)
        assert (cut, signals, cut_done.finish_reason, cut_done.completion_tokens) == (words, [], "length", start)
    whole, signals, _ = _reply(backend, max_tokens=start + len(image))
    assert [s.modality for s in signals] == ["image"] and text.startswith(whole)


def test_a_stop_string_ends_the_words_and_keeps_a_required_picture(backend: HFBackend) -> None:
    text, _, done = _reply(backend)
    assert re.match(r" Here is a (big|small) blue triangle\.", text)  # the size was not asked: the model picks
    # "." ends the words before the model's own group: no picture, unless one is required.
    cut, signals, cut_done = _reply(backend, stop=["."])
    assert (cut, signals, cut_done.finish_reason) == (text[:text.index(".")], [], "stop")
    assert cut_done.completion_tokens < done.completion_tokens
    cut, signals, cut_done = _reply(backend, stop=["."], require_modalities=["image"])
    assert cut == text[:text.index(".")] and [s.modality for s in signals] == ["image"]
    assert cut_done.finish_reason == "stop" and signals[0].forced
    # A stop string over several tokens, and one that never comes.
    assert _reply(backend, stop=["ue tri", "zzz"])[0] == text[:text.index("ue tri")]
    never, signals, _ = _reply(backend, stop=["zzz"])
    assert never == text and [s.modality for s in signals] == ["image"]
    # A space ends the reply after its first word: the space the model writes first is layout, not text.
    assert _reply(backend, stop=[" "])[0] == " Here"
