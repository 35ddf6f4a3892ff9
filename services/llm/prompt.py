"""The reference (legacy NExT-GPT demo) prompt as a sequence of token ids and media slots.

Layout: ``### Human:`` <Img> item </Img> `` text\\n### Assistant:`` ..., earlier turns joined with ``\\n###`` and
`` Human:``; every text segment between media items gets its own BOS, as the demo embeds them (behind the
bundle's ``bos_per_segment``). Unlike the demo we never split user text on `` <`` / ``> `` (the demo's regex
split turns such text into fake media tags), and every media item of a turn is a media slot (the demo embeds the
second tag of a turn as literal text).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.contracts.bundle_manifest import PromptSpec
from services.contracts.errors import InvalidRequestError
from services.contracts.llm import Turn

# No tokenizer's token averages this many characters: text longer than this many characters per allowed token
# cannot fit the prompt, so it is refused before the tokenizer (and the embedding table) spend anything on it.
MAX_CHARS_PER_TOKEN = 16


def check_prompt_chars(texts: list[str], max_tokens: int) -> None:
    chars = sum(len(t) for t in texts)
    if chars > max_tokens * MAX_CHARS_PER_TOKEN:
        raise InvalidRequestError(
            f"the conversation holds {chars} characters; a prompt of at most {max_tokens} tokens cannot hold more "
            f"than {max_tokens * MAX_CHARS_PER_TOKEN}", code="prompt_too_long", param="messages")


def prompt_starts(roles: list[str], kept: int) -> list[int]:
    """Where a prompt may start when a kept conversation (its first ``kept`` turns) must lose its oldest
    exchanges: at one of its user turns, or at the request's own first turn, last; never inside an exchange."""
    return [i for i in range(kept) if roles[i] == "user"] + [kept]


@dataclass(frozen=True)
class TextPiece:
    text: str


@dataclass(frozen=True)
class MediaPiece:
    index: int


Piece = TextPiece | MediaPiece


def prompt_pieces(spec: PromptSpec, turns: list[Turn]) -> list[Piece]:
    pieces: list[Piece] = []
    buffer = ""

    def flush() -> None:
        nonlocal buffer
        if buffer:
            pieces.append(TextPiece(buffer))
        buffer = ""

    def media(indices: list[int]) -> None:
        flush()
        pieces.extend(MediaPiece(i) for i in indices)

    human = spec.human_prefix.rstrip()  # "### Human:"
    follow_up = " " + human.lstrip("#").strip()  # " Human:" after a "\n###" separator
    first_user = True
    for turn in turns:
        if turn.role == "user":
            buffer += human if first_user else follow_up
            first_user = False
            if turn.media:
                media(turn.media)
            buffer += " " + turn.text + spec.assistant_prefix
        else:
            # A reply may come back trimmed ("Here is ...", as the service streams it) or as the model wrote it
            # (" Here is ...\n": the first token's leading space, the newline before the stop). The layout has one
            # space after "Assistant:" and the separator right after the reply, as the model was trained and as the
            # demo writes its history.
            buffer += " " + turn.text.strip()
            if turn.media:
                media(turn.media)
            buffer += spec.turn_separator
    flush()
    return pieces


def prompt_ids(spec: PromptSpec, pieces: list[Piece], encode: object) -> list[list[int] | int]:
    """Token ids per text piece (with BOS as the bundle says) and media indices as ints, in order.

    ``encode`` is ``tokenizer.encode``-like: text -> ids without special tokens.
    """
    out: list[list[int] | int] = []
    first = True
    for piece in pieces:
        if isinstance(piece, MediaPiece):
            out.append([spec.media_start_id])
            out.append(piece.index)
            out.append([spec.media_end_id])
            continue
        ids = list(encode(piece.text))  # type: ignore[operator]
        if spec.bos_per_segment or first:
            ids = [spec.bos_id, *ids]
        first = False
        out.append(ids)
    return out
