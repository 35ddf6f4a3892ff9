"""OpenAI Chat Completions requests into the gateway's own (``gateway.openai_compat``)."""

from __future__ import annotations

import pytest

from gateway.openai_compat import OpenAIChatRequest, to_chat_request
from services.contracts.errors import InvalidRequestError

MODELS = {"nextgpt": None}


def _translated(**body: object) -> object:
    request = OpenAIChatRequest.model_validate({"model": "nextgpt", "messages": [{"role": "user", "content": "hi"}],
                                                **body})
    return to_chat_request(request, MODELS, max_bytes=1024, max_files=4)[0]


def test_modalities_are_the_answers_output_types() -> None:
    """``modalities`` names what the answer is made of: the media named are required, and no others are made
    (["text"]: none); without it the model picks."""
    default = _translated()
    assert (default.allowed_modalities, default.require_modalities) == (None, [])  # type: ignore[attr-defined]
    text = _translated(modalities=["text"])
    assert (text.allowed_modalities, text.require_modalities) == ([], [])  # type: ignore[attr-defined]
    both = _translated(modalities=["text", "image"])
    assert (both.allowed_modalities, both.require_modalities) == (["image"], ["image"])  # type: ignore[attr-defined]


def test_seeds_are_any_int64_taken_modulo_2_63() -> None:
    assert _translated(seed=-1).seed == 2**63 - 1  # type: ignore[attr-defined]
    assert _translated(seed=5).seed == 5  # type: ignore[attr-defined]


def test_a_text_part_holds_a_string() -> None:
    with pytest.raises(InvalidRequestError) as info:
        _translated(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}])
    assert info.value.param == "messages[0].content[0].text"


@pytest.mark.parametrize(("message", "code", "param"), [
    ({"role": "tool", "content": "x", "tool_call_id": "1"}, "unsupported_role", "messages[0].role"),
    ({"role": "user", "content": [{"type": "file", "file": {"file_data": "x"}}]}, "unsupported_content_part",
     "messages[0].content[0]"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": "AAAA"}]}, "invalid_content",
     "messages[0].content[0]"),
    ({"role": "user", "content": 3}, "invalid_content", "messages[0]"),
])
def test_what_is_not_taken_is_named_by_its_own_code(message: dict[str, object], code: str, param: str) -> None:
    """Each refusal has a code of its own (the error type, invalid_request_error, said nothing more)."""
    with pytest.raises(InvalidRequestError) as info:
        _translated(messages=[message, {"role": "user", "content": "hi"}])
    assert (info.value.code, info.value.param) == (code, param)


def test_instructions_are_text_only() -> None:
    """A picture in a system message has no place in the prompt (the instructions join the first turn's words):
    a 400 naming it, not an upload no message refers to."""
    with pytest.raises(InvalidRequestError) as info:
        picture = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
        _translated(messages=[{"role": "system", "content": [{"type": "text", "text": "be brief"}, picture]},
                              {"role": "user", "content": "hi"}])
    assert info.value.param == "messages[0].content[1]" and "text only" in info.value.message


def test_a_data_url_may_carry_parameters() -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;name=shape.png;base64,iVBORw=="}}
    request, uploads = to_chat_request(OpenAIChatRequest.model_validate(
        {"model": "nextgpt", "messages": [{"role": "user", "content": [part]}]}), MODELS, max_bytes=1024, max_files=4)
    assert uploads == {"messages[0].content[0]": b"\x89PNG"} and request.messages[0].files == ["messages[0].content[0]"]
