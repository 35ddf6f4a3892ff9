"""The input projection: ImageBind's output -> LLM input tokens, in the two designs a bundle may choose.

``linear`` is the release's ``llama_proj``: the pooled ImageBind vector -> one LLM token. ``group`` is the
paper's design (GroupViT-style grouping, as the newer NExT-GPT code builds it: in_fc, stages of 64 then 8
learnable group tokens, out_fc): ImageBind's token-level features are gathered into a few concept tokens, each
becoming one LLM token. Our grouping stage:

1. the stage's learnable group tokens attend to the input tokens (cross-attention, then an MLP);
2. every input token is assigned to the groups by a softmax over query/key similarities;
3. each group's new token is its own token plus a projection of the assignment-weighted mean of its inputs.

The assignment is soft (GroupViT's is a straight-through hard Gumbel assignment): served output then depends
only on the input, never on sampled noise. Padding tokens (a batch of items with different token counts, e.g.
audio vs pictures) are masked out of both attention and assignment, so an item's tokens do not depend on what it
was batched with.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from services.contracts.bundle_manifest import InputProjectionSpec


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


class GroupingStage(nn.Module):
    def __init__(self, width: int, groups: int, num_heads: int) -> None:
        super().__init__()
        self.group_tokens = nn.Parameter(torch.randn(1, groups, width) * 0.02)
        self.norm_inputs = nn.LayerNorm(width)
        self.norm_groups = nn.LayerNorm(width)
        self.gather = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.group_mlp = _mlp(width)
        self.assign_query = nn.Linear(width, width)
        self.assign_key = nn.Linear(width, width)
        self.merge = nn.Linear(width, width)
        self.out_mlp = _mlp(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, width) with ``mask`` (B, T), True for real tokens -> (B, groups, width)."""
        groups = self.group_tokens.expand(x.shape[0], -1, -1)
        keys = self.norm_inputs(x)
        padding = None if mask is None else ~mask
        gathered, _ = self.gather(self.norm_groups(groups), keys, keys, key_padding_mask=padding, need_weights=False)
        groups = groups + gathered
        groups = groups + self.group_mlp(groups)
        scores = self.assign_key(keys) @ self.assign_query(self.norm_groups(groups)).transpose(1, 2)
        assignment = (scores / math.sqrt(x.shape[-1])).softmax(dim=-1)  # (B, T, groups): each input token's share
        if mask is not None:
            assignment = assignment * mask.unsqueeze(-1).to(assignment.dtype)
        pooled = assignment.transpose(1, 2) @ x / (assignment.sum(dim=1).unsqueeze(-1) + 1e-6)
        out = groups + self.merge(pooled)
        return out + self.out_mlp(out)


class GroupProjection(nn.Module):
    def __init__(self, spec: InputProjectionSpec, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_fc = nn.Linear(in_dim, spec.width)
        self.stages = nn.ModuleList(GroupingStage(spec.width, n, spec.num_heads) for n in spec.groups)
        self.norm = nn.LayerNorm(spec.width)
        self.out_fc = nn.Linear(spec.width, out_dim)
        self.in_features, self.out_features = in_dim, out_dim

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token features (B, T, in_dim) -> (B, groups[-1], out_dim)."""
        x = self.in_fc(tokens)
        for i, stage in enumerate(self.stages):
            x = stage(x, mask if i == 0 else None)
        return self.out_fc(self.norm(x))


def build_input_projection(spec: InputProjectionSpec, in_dim: int, out_dim: int) -> nn.Module:
    if spec.kind == "group":
        return GroupProjection(spec, in_dim, out_dim)
    return nn.Linear(in_dim, out_dim)


def padding_mask(tokens: torch.Tensor) -> torch.Tensor:
    """Which rows of zero-padded token features are real: ImageBind's token features are L2-normalised, so no
    real token is all zeros."""
    return tokens.abs().sum(dim=-1) > 0


def project_media(projection: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Pooled vectors (B, in_dim) -> (B, 1, out_dim) through ``linear``; zero-padded token features
    (B, T, in_dim) -> (B, groups, out_dim) through ``group``."""
    if isinstance(projection, GroupProjection):
        return projection(features, padding_mask(features))
    return projection(features).unsqueeze(1)
