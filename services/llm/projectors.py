"""The bundle's output projectors: signal-token hidden states -> decoder conditioning."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from services.bundle.loader import Bundle
from services.contracts.bundle_manifest import Modality
from services.modeling.projector import OutputProjector


class Projectors:
    def __init__(self, bundle: Bundle, device: torch.device) -> None:
        self.modules: dict[Modality, OutputProjector] = {}
        self.signal_rows: dict[Modality, torch.Tensor] = {}
        for modality, spec in bundle.manifest.outputs.items():
            module = OutputProjector(spec.projector)
            module.load_state_dict(load_file(str(bundle.path(spec.projector.weights))), strict=True)
            self.modules[modality] = module.to(device).eval()
            rows = load_file(str(bundle.path(spec.projector.signal_embeddings)))["signal_input_embeddings"]
            self.signal_rows[modality] = rows.to(device)

    @torch.inference_mode()
    def project(self, modality: Modality, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) states at the group's positions -> conditioning, e.g. (77, 768) or (512,)."""
        module = self.modules[modality]
        rows = self.signal_rows[modality].to(dtype=next(module.parameters()).dtype)
        return module(hidden.to(rows.dtype)[None], rows)[0].float().cpu()
