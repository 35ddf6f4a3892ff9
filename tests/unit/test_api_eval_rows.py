"""`nextgpt eval world --modality`: a partial run asks exactly the full run's questions of the rows it keeps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from services.world.api_eval import evaluate_api


class Recorder:
    """Stands in for the HTTP client: records each request and answers with empty words and nothing made."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str | None]] = []

    def chat(self, text: str, media: tuple[str, np.ndarray] | None = None, conversation_id: str | None = None,
             seed: int = 0) -> dict[str, Any]:
        self.asked.append((text, media[0] if media else None))
        return {"text": "", "artifacts": [], "conversation_id": "c"}

    def complete(self, text: str, system: str, seed: int = 0) -> dict[str, Any]:
        self.asked.append((f"{system} {text}", None))
        return {"text": "", "made": []}

    def artifacts(self, reply: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
        return []


def _run(modalities: tuple[str, ...], count: int = 3) -> tuple[list[tuple[str, str | None]], set[str]]:
    client = Recorder()
    table = evaluate_api(client, count=count, modalities=modalities)  # type: ignore[arg-type]
    return client.asked, set(table)


def _is_subsequence(part: list[Any], whole: list[Any]) -> bool:
    rest = iter(whole)
    return all(any(item == other for other in rest) for item in part)


# Asked whatever the modalities: small talk (text in, text out), with and without a system prompt. Asked of each
# modality once in three items: a request as typed, a thing outside the world, a description with nothing sent
# and a request after a system prompt (the modalities in turn).
ORDINARY = {"small talk", "a request as typed (lower case, no stop)", "a thing outside the world",
            "asked to describe, nothing sent", "after a system prompt (OpenAI API)"}


@pytest.mark.parametrize(("modalities", "asked", "rows"), [
    # without video: its describe (twice: on black and on a background), generate and image -> video rows (4
    # requests per item) go, and its turn of the ordinary rows (4 of 15)
    (("image", "audio"), 3 * 20 + 14, {"describe image", "generate image", "describe audio", "generate audio",
                                      "describe image on a background", "describe a transparent picture",
                                      "describe a longer tone", "two media in one reply",
                                      "follow-up changes one attribute", "a second drawing in a conversation",
                                      "asked about the picture it made", "drawings 4-6 of a conversation",
                                      *ORDINARY}),
    (("audio",), 3 * 3 + 10, {"describe audio", "generate audio", "describe a longer tone", *ORDINARY}),
])
def test_a_partial_run_keeps_each_rows_items(modalities: tuple[str, ...], asked: int, rows: set[str]) -> None:
    full, all_rows = _run(("image", "video", "audio"))
    assert len(full) == 3 * 32 and {"image -> video", "describe video on a background"} | ORDINARY <= all_rows
    part, part_rows = _run(modalities)
    assert part_rows == rows
    assert len(part) == asked
    assert all(media in (None, *modalities) for _, media in part)
    # The same texts in the same order: the rows left out still drew their samples and phrasings.
    assert _is_subsequence(part, full)


def test_an_unknown_modality_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown modalities"):
        evaluate_api(Recorder(), count=1, modalities=("image", "smell"))  # type: ignore[arg-type]
