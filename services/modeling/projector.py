"""The NExT-GPT output projector: signal-token hidden states -> decoder conditioning.

Its parameter names (``fc``, ``tfm``, ``model``, ``query_embs``) follow the released checkpoint's layout
(``gen_text_hidden_fcs*.0.*``) so that converted weights load with ``strict=True``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from services.contracts.bundle_manifest import ProjectorSpec


class OutputProjector(nn.Module):
    def __init__(self, spec: ProjectorSpec) -> None:
        super().__init__()
        self.spec = spec
        self.fc = nn.Linear(spec.in_dim, spec.hidden_dim)
        with warnings.catch_warnings():
            # norm_first (the released layout) rules out torch's nested-tensor path for padded batches, which
            # torch says at every projector built; none of our calls pads, so nothing is lost.
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True", category=UserWarning)
            self.tfm = nn.Transformer(
                d_model=spec.hidden_dim,
                nhead=spec.num_heads,
                num_encoder_layers=spec.num_encoder_layers,
                num_decoder_layers=spec.num_decoder_layers,
                dim_feedforward=spec.ffn_dim,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
        self.model = nn.Linear(spec.hidden_dim, spec.out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, spec.num_queries, spec.hidden_dim))

    def forward(self, hidden: torch.Tensor, signal_embeddings: torch.Tensor) -> torch.Tensor:
        """Map ``hidden`` (B, N, in_dim) plus the signal tokens' input embeddings (N, in_dim) to conditioning.

        Returns (B, num_queries, out_dim), or (B, out_dim) for a single-query (pooled) projector.
        """
        x = self.fc(hidden + signal_embeddings)
        queries = self.query_embs.expand(x.shape[0], -1, -1)
        out = self.model(self.tfm(x, queries))
        if self.spec.num_queries == 1:
            out = out[:, 0]
        return out
