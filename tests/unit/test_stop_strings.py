"""Stop strings over streamed text: the text ends before the first stop string, none of it is ever sent, and
text held back because it might have started one goes out once it turns out not to."""

from __future__ import annotations

import pytest

from services.llm.stop_strings import StopStrings


def _run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    filt = StopStrings(stops)
    sent, matched = [], False
    for piece in pieces:
        out = filt.push(piece)
        sent.append(out.text)
        matched = out.matched
    return sent, matched, filt.flush()


@pytest.mark.parametrize(("stops", "pieces", "text"), [
    (["###"], ["Hello #", "# wor", "ld ###", " more"], "Hello ## world "),  # a false start goes out later
    (["ue tri"], [" a", " bl", "ue", " tri", "angle"], " a bl"),  # straddling three pieces
    (["END", "."], ["one. two END"], "one"),  # the earliest of several
    (["a"], ["a"], ""),
])
def test_text_ends_before_the_first_stop_string(stops: list[str], pieces: list[str], text: str) -> None:
    sent, matched, held = _run(stops, pieces)
    assert "".join(sent) == text and matched and held == ""


@pytest.mark.parametrize(("stops", "pieces", "text"), [
    ([" "], [" Here", " is", " a"], " Here"),  # the space the reply starts with is layout, not a match
    ([" "], [" ", "\n", " Here is"], " \n Here"),  # leading whitespace over several pieces
    ([" Here"], [" Here", " is"], " Here is"),  # what the client never sees as text never matches
    (["\n"], ["\n", "Here\n", "###"], "\nHere"),
])
def test_the_reply_s_leading_whitespace_matches_no_stop_string(stops: list[str], pieces: list[str],
                                                                 text: str) -> None:
    filt = StopStrings(stops)
    sent = "".join(filt.push(p).text for p in pieces) + filt.flush()
    assert sent == text and filt.matched == (text != "".join(pieces))


def test_nothing_is_sent_before_it_is_known_not_to_start_a_stop_string() -> None:
    sent, matched, held = _run(["abc"], ["xa", "b", "d"])
    assert sent == ["x", "", "abd"] and not matched and held == ""
    sent, matched, held = _run(["abc"], ["xa", "b"])  # the reply ended on a possible start: it was text
    assert sent == ["x", ""] and not matched and held == "ab"


def test_no_stop_strings_pass_text_through_and_nothing_follows_a_match() -> None:
    assert _run([], ["a", "b"]) == (["a", "b"], False, "")
    filt = StopStrings(["b"])
    assert filt.push("ab").text == "a" and filt.push("more").text == "" and filt.matched
