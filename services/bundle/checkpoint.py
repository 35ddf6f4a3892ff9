"""The released ``pytorch_model.pt``: sort every key into the part of the bundle it belongs to.

The reference loads this file with ``strict=False`` and silently drops whatever does not match; we account
for every key and refuse the file when one is unused or one we need is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from services.bundle.release import LORA_TARGETS, PROJECTOR_PREFIXES

# peft 0.3 names adapters ``lora_A.default.weight``; older saves drop the adapter name.
_LORA_RE = re.compile(
    r"^llama_model\.base_model\.model\.model\.layers\.(?P<layer>\d+)\.self_attn\.(?P<proj>[qkvo]_proj)"
    r"\.lora_(?P<ab>[AB])(?:\.default)?\.weight$"
)
# Stage 3 (PEFT-wrapped) names first; stage 1/2 names are what agent.load_parameters remaps (issue #40).
_EMBED_KEYS = ("llama_model.base_model.model.model.embed_tokens.weight", "llama_model.model.embed_tokens.weight")
_HEAD_KEYS = ("llama_model.base_model.model.lm_head.weight", "llama_model.lm_head.weight")


class CheckpointError(ValueError):
    pass


@dataclass
class ReleaseCheckpoint:
    embed_tokens: torch.Tensor
    lm_head: torch.Tensor
    llama_proj_weight: torch.Tensor
    llama_proj_bias: torch.Tensor
    # (layer, projection) -> (A (r, in), B (out, r))
    lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    projectors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def lora_rank(self) -> int:
        return next(iter(self.lora.values()))[0].shape[0]


def split_checkpoint(state: dict[str, torch.Tensor], num_layers: int) -> ReleaseCheckpoint:
    problems: list[str] = []
    used: set[str] = set()

    def take(candidates: tuple[str, ...], what: str) -> torch.Tensor | None:
        present = [k for k in candidates if k in state]
        if len(present) > 1:
            problems.append(f"{what} appears under several names: {present}")
        if not present:
            problems.append(f"missing {what} (expected key {candidates[0]!r})")
            return None
        used.add(present[0])
        return state[present[0]]

    embed = take(_EMBED_KEYS, "embed_tokens")
    head = take(_HEAD_KEYS, "lm_head")
    proj_w = take(("llama_proj.weight",), "llama_proj.weight")
    proj_b = take(("llama_proj.bias",), "llama_proj.bias")

    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _LORA_RE.match(key)
        if match:
            used.add(key)
            halves.setdefault((int(match["layer"]), match["proj"]), {})[match["ab"]] = tensor
    lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in range(num_layers):
        for proj in LORA_TARGETS:
            pair = halves.pop((layer, proj), {})
            if set(pair) != {"A", "B"}:
                problems.append(f"missing LoRA {'/'.join(sorted({'A', 'B'} - set(pair)))} for layer {layer} {proj}")
                continue
            a, b = pair["A"], pair["B"]
            if a.shape[0] != b.shape[1]:
                problems.append(f"LoRA layer {layer} {proj}: A {list(a.shape)} and B {list(b.shape)} disagree on rank")
            lora[(layer, proj)] = (a, b)
    for layer, proj in sorted(halves):
        problems.append(f"LoRA weights for layer {layer} {proj}, but the base model has {num_layers} layers")

    projectors: dict[str, dict[str, torch.Tensor]] = {}
    for modality, prefix in PROJECTOR_PREFIXES.items():
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not weights:
            problems.append(f"missing the {modality} projector (keys {prefix}*)")
        used.update(prefix + k for k in weights)
        projectors[modality] = weights

    unused = sorted(set(state) - used)
    if unused:
        shown = ", ".join(unused[:10]) + (f" (+{len(unused) - 10} more)" if len(unused) > 10 else "")
        problems.append(f"{len(unused)} unused keys: {shown}")
    if embed is not None and head is not None and embed.shape != head.shape:
        problems.append(f"embed_tokens {list(embed.shape)} and lm_head {list(head.shape)} differ")
    if problems:
        raise CheckpointError("; ".join(problems))
    assert embed is not None and head is not None and proj_w is not None and proj_b is not None
    return ReleaseCheckpoint(embed, head, proj_w, proj_b, lora, projectors)
