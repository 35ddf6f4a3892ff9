"""Prompt layout against the reference demo's string-and-split procedure; the signal-group controller."""

from __future__ import annotations

import re

import pytest

from services.contracts.bundle_manifest import PromptSpec
from services.contracts.llm import GenerateParams, Turn
from services.llm.prompt import MediaPiece, TextPiece, prompt_ids, prompt_pieces
from services.llm.sampling import sample

SPEC = PromptSpec(media_start_id=100, media_end_id=101, bos_id=1)


def _reference(turns: list[tuple[str | None, str, str | None]]) -> list[str]:
    """The demo: build one string with <Image>path</Image> tags and history, then re.split(' <|> ')."""
    prompt = ""
    for i, (tag, question, answer) in enumerate(turns):
        head = "### Human: " if i == 0 else " Human: "
        body = f"<Image>{tag}</Image>  {question}" if tag else question
        prompt += head + body
        if answer is not None:
            prompt += f"\n### Assistant: {answer}\n###"
    prompt += "\n### Assistant:"
    return re.split(" <|> ", prompt)


def _ours(turns: list[tuple[str | None, str, str | None]]) -> list[str]:
    structured: list[Turn] = []
    for i, (tag, question, answer) in enumerate(turns):
        structured.append(Turn(role="user", text=question, media=[i] if tag else []))
        if answer is not None:
            structured.append(Turn(role="assistant", text=answer))
    return [p.text if isinstance(p, TextPiece) else f"Image>{p.index}</Image" for p in prompt_pieces(SPEC, structured)]


@pytest.mark.parametrize(
    "turns",
    [
        [(None, "hello there", None)],
        [("0", "what is in this picture?", None)],
        [("0", "describe it", "a dog on grass"), (None, "and its colour?", None)],
        [(None, "hi", "hello, how can I help"), ("1", "look at this", None)],
        [("0", "one", "first"), (None, "two", "second"), ("2", "three", None)],
    ],
)
def test_layout_matches_reference(turns: list[tuple[str | None, str, str | None]]) -> None:
    assert _ours(turns) == _reference(turns)


def test_user_text_is_never_split_into_fake_media() -> None:
    pieces = prompt_pieces(SPEC, [Turn(role="user", text="a <Image>x</Image> b > c")])
    assert pieces == [TextPiece("### Human: a <Image>x</Image> b > c\n### Assistant:")]


def test_bos_per_segment_and_media_wrappers() -> None:
    pieces = prompt_pieces(SPEC, [Turn(role="user", text="hi", media=[0, 1])])
    assert pieces == [TextPiece("### Human:"), MediaPiece(0), MediaPiece(1), TextPiece(" hi\n### Assistant:")]
    plan = prompt_ids(SPEC, pieces, lambda text: [len(text)])
    assert plan == [[1, 10], [100], 0, [101], [100], 1, [101], [1, 18]]
    single = SPEC.model_copy(update={"bos_per_segment": False})
    assert prompt_ids(single, pieces, lambda text: [len(text)])[-1] == [18]


def test_a_stored_reply_is_laid_out_as_trained() -> None:
    """A reply comes back as streamed (a leading space, a newline before the stop): the history has it as the
    model learnt it, one space after "Assistant:" and the separator right after the words."""
    turns = [Turn(role="user", text="draw it"), Turn(role="assistant", text=" Here it is.\n", media=[0]),
             Turn(role="user", text="again")]
    assert prompt_pieces(SPEC, turns) == [TextPiece("### Human: draw it\n### Assistant: Here it is."), MediaPiece(0),
                                          TextPiece("\n### Human: again\n### Assistant:")]


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="last turn"):
        GenerateParams(turns=[Turn(role="assistant", text="x")])
    with pytest.raises(ValueError, match="subset"):
        GenerateParams(turns=[Turn(role="user")], allowed_modalities=["image"], require_modalities=["audio"])


def test_sampling_greedy_topk_topp() -> None:
    import torch

    logits = torch.tensor([1.0, 5.0, 3.0, -2.0])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0, 1.0, 0, g) == 1
    assert {sample(logits, 1.0, 0.01, 0, g) for _ in range(50)} == {1}  # the demo's top_p: effectively greedy
    assert {sample(logits, 5.0, 1.0, 2, g) for _ in range(200)} == {1, 2}
