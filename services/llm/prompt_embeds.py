"""The prompt as one (L, hidden) embedding tensor, shared by every backend: text rows from the LLM's input
embedding table, the projected tokens of each media item (one per item in the release, a few with ``group``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from services.contracts.bundle_manifest import BundleManifest
from services.contracts.errors import InvalidRequestError
from services.contracts.llm import GenerateParams
from services.llm.prompt import check_prompt_chars, prompt_ids, prompt_pieces

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
    spec = manifest.prompt
    check_prompt_chars([t.text for t in params.turns], max_tokens)
    plan = prompt_ids(spec, prompt_pieces(spec, params.turns), encode)
    hidden = manifest.llm.hidden_size
    vectors = media_tokens(media, hidden)
    used = [p for p in plan if isinstance(p, int)]
    if any(i < 0 or i >= len(vectors) for i in used):
        raise InvalidRequestError(f"turns reference media {sorted(set(used))} but {len(vectors)} were given",
                                  code="invalid_media_index", param="turns")
    rows = []
    for part in plan:
        if isinstance(part, int):
            rows.append(vectors[part])
        else:
            rows.append(embed(part).float().cpu())
    embeds = torch.cat(rows)
    if embeds.shape[0] > max_tokens:
        raise InvalidRequestError(f"prompt is {embeds.shape[0]} tokens, the limit is {max_tokens}",
                                  code="prompt_too_long", param="turns")
    return embeds
