"""The prompt as one (L, hidden) embedding tensor, shared by every backend: text rows from the LLM's input
embedding table, the projected tokens of each media item (one per item in the release, a few with ``group``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from services.contracts.bundle_manifest import BundleManifest
from services.contracts.chat import with_system
from services.contracts.errors import InvalidRequestError
from services.contracts.llm import GenerateParams
from services.llm.prompt import MAX_CHARS_PER_TOKEN, check_prompt_chars, prompt_ids, prompt_pieces, prompt_starts

Embed = Callable[[list[int]], torch.Tensor]  # token ids -> (n, hidden)


def media_tokens(media: np.ndarray | None, hidden: int) -> torch.Tensor:
    """The request's media as (items, tokens per item, hidden): (items, hidden) is the release's one token per
    item; a ``group`` input projection gives each item several."""
    vectors = torch.from_numpy(np.asarray(media, dtype=np.float32)) if media is not None else torch.zeros(0, hidden)
    if vectors.ndim == 2:
        vectors = vectors.unsqueeze(1)
    if vectors.ndim != 3 or vectors.shape[-1] != hidden or vectors.shape[1] == 0:
        raise InvalidRequestError(f"media vectors must be (items, {hidden}) or (items, tokens, {hidden}), got "
                                  f"{list(vectors.shape)}", code="invalid_media_embeddings", param="media")
    return vectors


def build_prompt_embeddings(manifest: BundleManifest, encode: Callable[[str], list[int]], embed: Embed,
                            params: GenerateParams, media: np.ndarray | None, max_tokens: int) -> torch.Tensor:
    """(L, hidden). The prompt fits ``max_tokens`` and leaves the reply's budget room in the model's context
    (``max_model_len``): prompt + reply beyond it is what vLLM refuses, and positions the model never saw. Where it
    would not fit, the oldest exchanges of the kept conversation (``params.history_turns``) are left out, whole,
    never the request's own turns; if those alone do not fit, the request is refused saying what would."""
    spec = manifest.prompt
    reply = params.max_tokens or manifest.generation.max_new_tokens
    context = manifest.llm.max_model_len
    limit = min(max_tokens, context - reply)
    own = params.turns[params.history_turns:]
    check_prompt_chars([*params.system, *(t.text for t in own)], max_tokens)
    hidden = manifest.llm.hidden_size
    vectors = media_tokens(media, hidden)
    used = sorted({i for t in params.turns for i in t.media})
    if any(i < 0 or i >= len(vectors) for i in used):
        raise InvalidRequestError(f"turns reference media {used} but {len(vectors)} were given",
                                  code="invalid_media_index", param="turns")

    def plan(start: int) -> list[list[int] | int]:
        turns = params.turns[start:]
        if params.system:  # before the words of whichever turn opens the prompt
            turns = [turns[0].model_copy(update={"text": with_system(params.system, turns[0].text)}), *turns[1:]]
        return prompt_ids(spec, prompt_pieces(spec, turns), encode)

    def length(parts: list[list[int] | int]) -> int:
        return sum(vectors.shape[1] if isinstance(p, int) else len(p) for p in parts)

    # Where the prompt may start: a user turn of the kept conversation, or the request's own first turn. A kept
    # conversation longer in characters than any prompt could hold is cut to that first (no tokenizing it all).
    cuts = prompt_starts([t.role for t in params.turns], params.history_turns)
    system_chars = sum(len(s) + 1 for s in params.system)  # the same before whichever turn opens the prompt
    chars = [sum(len(t.text) for t in params.turns[i:]) + system_chars for i in cuts]
    cuts = [i for i, n in zip(cuts, chars, strict=True) if n <= max_tokens * MAX_CHARS_PER_TOKEN] or cuts[-1:]
    # The prompt's length only shrinks as its start moves later: the earliest start that fits, by bisection.
    low, high = 0, len(cuts) - 1
    best = plan(cuts[high])
    if length(best) <= limit:
        while low < high:
            middle = (low + high) // 2
            parts = plan(cuts[middle])
            if length(parts) <= limit:
                best, high = parts, middle
            else:
                low = middle + 1
    tokens = length(best)
    if tokens > max_tokens:
        raise InvalidRequestError(f"prompt is {tokens} tokens, the limit is {max_tokens}", code="prompt_too_long",
                                  param="turns")
    if tokens > limit:
        fix = f"shorten the messages or ask for max_tokens <= {context - tokens}" if tokens < context else \
            "shorten the messages"
        raise InvalidRequestError(
            f"prompt is {tokens} tokens and the reply may take {reply} (max_tokens): together more than the model's "
            f"context of {context} tokens; {fix}", code="prompt_too_long", param="max_tokens")
    return torch.cat([vectors[p] if isinstance(p, int) else embed(p).float().cpu() for p in best])
