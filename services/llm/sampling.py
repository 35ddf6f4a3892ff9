"""Next-token choice: temperature, top-k, top-p (nucleus), with a per-request generator for reproducibility."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
           generator: torch.Generator) -> int:
    """``logits``: (vocab,), already masked. Temperature 0 is greedy."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
        drop = cumulative - torch.softmax(ordered, dim=-1) >= top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
