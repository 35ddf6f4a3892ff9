"""The prompt fits the model's context with the reply's budget: a kept conversation loses its oldest exchanges
(whole, the request's own turns never), a caller's own too-long messages are refused saying what would fit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from services.bundle.loader import Bundle, load_bundle
from services.contracts.chat import with_system
from services.contracts.errors import InvalidRequestError
from services.contracts.llm import GenerateParams, Turn
from services.llm.prompt import prompt_ids, prompt_pieces
from services.llm.prompt_embeds import build_prompt_embeddings

WORLD = Path(__file__).resolve().parents[2] / "bundles" / "nextgpt-world"


@pytest.fixture(scope="module")
def world() -> tuple[Bundle, object]:
    """The world bundle's tokenizer and prompt layout, with a context of 2048 (the world bundle's own is 512)."""
    bundle = load_bundle(WORLD)
    manifest = bundle.manifest
    wider = manifest.model_copy(update={"llm": manifest.llm.model_copy(update={"max_model_len": 2048})})
    return replace(bundle, manifest=wider), AutoTokenizer.from_pretrained(str(bundle.path(manifest.llm.path)))


def _build(world: tuple[Bundle, object], params: GenerateParams, limit: int | None = None) -> torch.Tensor:
    bundle, tokenizer = world
    manifest = bundle.manifest
    return build_prompt_embeddings(
        manifest, lambda t: tokenizer.encode(t, add_special_tokens=False),  # type: ignore[attr-defined]
        lambda ids: torch.zeros(len(ids), manifest.llm.hidden_size), params, None,
        limit or manifest.llm.max_model_len)


def _length(world: tuple[Bundle, object], turns: list[Turn]) -> int:
    """The prompt's tokens, uncapped (text only)."""
    bundle, tokenizer = world
    spec = bundle.manifest.prompt
    plan = prompt_ids(spec, prompt_pieces(spec, turns), lambda t: tokenizer.encode(t, add_special_tokens=False))  # type: ignore[attr-defined]
    return sum(len(p) for p in plan if isinstance(p, list))


def _conversation(exchanges: int, words: int) -> list[Turn]:
    turns = []
    for i in range(exchanges):
        turns += [Turn(role="user", text=f"request {i} " + "blue " * words),
                  Turn(role="assistant", text=f" Here is reply {i}.\n")]
    return turns


def test_a_short_conversation_is_the_whole_prompt(world: tuple[Bundle, object]) -> None:
    turns = [*_conversation(3, 20), Turn(role="user", text="and now?")]
    kept = _build(world, GenerateParams(turns=turns, history_turns=6))
    assert kept.shape[0] == _build(world, GenerateParams(turns=turns)).shape[0]


def test_a_long_kept_conversation_drops_its_oldest_exchanges(world: tuple[Bundle, object]) -> None:
    context = world[0].manifest.llm.max_model_len
    history = _conversation(12, 300)  # ~3700 tokens: more than the context
    turns = [*history, Turn(role="user", text="and now?")]
    for max_tokens in (64, 1000):
        params = GenerateParams(turns=turns, history_turns=len(history), max_tokens=max_tokens)
        length = _build(world, params).shape[0]
        assert length <= context - max_tokens
        # The earliest start that fits: one more exchange would not.
        fits = [_length(world, turns[i:]) for i in range(0, 24, 2)]
        kept = next(n for n in fits if n <= context - max_tokens)
        assert length == kept
        assert fits[fits.index(kept) - 1] > context - max_tokens


def test_the_requests_own_turns_are_never_dropped(world: tuple[Bundle, object]) -> None:
    history = _conversation(2, 10)
    own = _conversation(8, 300)[1:] + [Turn(role="user", text="and now?")]  # a caller-sent history, too long
    params = GenerateParams(turns=[*history, *own], history_turns=len(history), max_tokens=64)
    with pytest.raises(InvalidRequestError) as refused:
        _build(world, params)
    assert refused.value.code == "prompt_too_long"
    # Without a kept conversation nothing is dropped either: the caller's history is the caller's to shorten.
    with pytest.raises(InvalidRequestError, match="context of 2048 tokens; shorten the messages or ask for"):
        _build(world, GenerateParams(turns=[*_conversation(3, 400), Turn(role="user", text="x")], max_tokens=1000))


def test_a_kept_conversation_opening_with_a_reply_starts_at_a_request(world: tuple[Bundle, object]) -> None:
    # The store keeps a window of turns, which may open with a reply whose request left it.
    turns = [Turn(role="assistant", text=" Here is a reply.\n"), Turn(role="user", text="hello")]
    whole = _build(world, GenerateParams(turns=turns, history_turns=1)).shape[0]
    assert whole == _build(world, GenerateParams(turns=turns[1:])).shape[0]


def test_a_conversations_system_opens_its_prompt_whichever_turn_opens_it(world: tuple[Bundle, object]) -> None:
    """The system messages of a kept conversation join the words of the prompt's first turn, also once its oldest
    exchanges are left out (before, they were stored in its first turn and left with it); they count toward what
    fits."""
    bundle, tokenizer = world
    manifest = bundle.manifest
    texts: list[str] = []

    def embed(ids: list[int]) -> torch.Tensor:
        texts.append(tokenizer.decode(ids))  # type: ignore[attr-defined]
        return torch.zeros(len(ids), manifest.llm.hidden_size)

    def prompt(turns: list[Turn], history: int) -> tuple[str, int]:
        texts.clear()
        params = GenerateParams(turns=turns, history_turns=history, max_tokens=64, system=["Be brief."])
        length = build_prompt_embeddings(manifest, lambda t: tokenizer.encode(t, add_special_tokens=False),  # type: ignore[attr-defined]
                                         embed, params, None, manifest.llm.max_model_len).shape[0]
        return " ".join(texts), length

    short = [*_conversation(2, 5), Turn(role="user", text="and now?")]
    text, length = prompt(short, 4)
    assert "Be brief. request 0" in text and text.count("Be brief.") == 1
    assert length == _length(world, [Turn(role="user", text=with_system(["Be brief."], short[0].text)), *short[1:]])
    long = [*_conversation(12, 300), Turn(role="user", text="and now?")]
    text, length = prompt(long, 24)
    assert "request 0 " not in text and text.count("Be brief.") == 1
    opening = text.index("Be brief.")
    assert text[opening:].startswith("Be brief. request ") and "request" not in text[:opening]
    assert length <= manifest.llm.max_model_len - 64
