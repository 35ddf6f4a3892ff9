"""ImageBind + the input projection, as the reference runs them (see nextgpt-model-facts, section 2)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

from services.bundle.loader import Bundle
from services.contracts.encoder import InputModality
from services.modeling.imagebind import build_imagebind, load_served_weights, modality_types


class EncoderModel:
    def __init__(self, imagebind: nn.Module, projection: nn.Linear, device: torch.device, dtype: torch.dtype) -> None:
        self.imagebind = imagebind.to(device=device, dtype=dtype).eval()
        self.projection = projection.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        types = modality_types()
        self._keys: dict[InputModality, str] = {"image": types.VISION, "video": types.VISION, "audio": types.AUDIO}
        self._audio_key = types.AUDIO

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: str = "cpu", dtype: torch.dtype = torch.float32) -> EncoderModel:
        spec = bundle.manifest.encoder
        imagebind = build_imagebind(spec.config)
        load_served_weights(imagebind, load_file(str(bundle.path(spec.weights))), str(bundle.path(spec.weights)))
        proj_state = load_file(str(bundle.path(spec.input_projection)))
        out_dim, in_dim = proj_state["weight"].shape
        projection = nn.Linear(in_dim, out_dim)
        projection.load_state_dict(proj_state, strict=True)
        return cls(imagebind, projection, torch.device(device), dtype)

    @property
    def hidden_size(self) -> int:
        return self.projection.out_features

    @torch.inference_mode()
    def embed(self, modality: InputModality, batch: torch.Tensor) -> torch.Tensor:
        """ImageBind embeddings (B, 1024): vision L2-normalised; audio L2-normalised WITHOUT upstream's x20 scale
        (the release's copy of ImageBind applies only the normalisation); clips and crops averaged."""
        key = self._keys[modality]
        x = batch.to(device=self.device, dtype=self.dtype)
        views = x.ndim >= 5  # audio clips (B, 3, 1, 128, 204) and video views (B, 15, 3, 2, 224, 224)
        if views:
            b, s = x.shape[:2]
            x = x.reshape(b * s, *x.shape[2:])
        m = self.imagebind
        inputs = m.modality_preprocessors[key](**{key: x})
        out = m.modality_trunks[key](**inputs["trunk"])
        out = m.modality_heads[key](out, **inputs["head"])
        post = m.modality_postprocessors[key]
        out = post[0](out) if key == self._audio_key else post(out)
        if views:
            out = out.reshape(b, s, -1).mean(dim=1)
        return out.float()

    @torch.inference_mode()
    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """1024 -> LLM hidden (``llama_proj``): one input token per media item."""
        return self.projection(embeddings.to(device=self.device, dtype=self.dtype)).float().cpu()
