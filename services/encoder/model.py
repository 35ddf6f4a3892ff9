"""ImageBind + the input projection, as the reference runs them (see nextgpt-model-facts, section 2), in the
release's ``linear`` design or the paper's ``group`` design (``services.modeling.input_projection``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from services.bundle.loader import Bundle
from services.contracts.bundle_manifest import InputProjectionSpec
from services.contracts.encoder import InputModality
from services.modeling.input_projection import build_input_projection, project_media
from services.modeling.imagebind import build_imagebind, load_served_weights, modality_types, token_features


class EncoderModel:
    def __init__(self, imagebind: nn.Module, projection: nn.Module, device: torch.device, dtype: torch.dtype,
                 spec: InputProjectionSpec | None = None) -> None:
        self.imagebind = imagebind.to(device=device, dtype=dtype).eval()
        self.projection = projection.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self.spec = spec or InputProjectionSpec()
        types = modality_types()
        self._keys: dict[InputModality, str] = {"image": types.VISION, "video": types.VISION, "audio": types.AUDIO}
        self._audio_key = types.AUDIO

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: str = "cpu", dtype: torch.dtype = torch.float32) -> EncoderModel:
        spec = bundle.manifest.encoder
        imagebind = build_imagebind(spec.config)
        load_served_weights(imagebind, load_file(str(bundle.path(spec.weights))), str(bundle.path(spec.weights)))
        projection = load_input_projection(bundle)
        return cls(imagebind, projection, torch.device(device), dtype, spec.projection)

    @property
    def hidden_size(self) -> int:
        return int(self.projection.out_features)

    @property
    def tokens_per_item(self) -> int:
        return self.spec.tokens_per_item

    @torch.inference_mode()
    def features(self, modality: InputModality, batch: torch.Tensor) -> torch.Tensor:
        """What the bundle's input projection takes: pooled vectors (B, 1024) for ``linear``, token-level
        features (B, T, 1024) for ``group``."""
        if self.spec.kind == "group":
            return self.tokens(modality, batch)
        return self.embed(modality, batch)

    def _trunk(self, modality: InputModality, batch: torch.Tensor) -> tuple[torch.Tensor, dict, int, int]:
        key = self._keys[modality]
        x = batch.to(device=self.device, dtype=self.dtype)
        b, views = x.shape[0], 1
        if x.ndim >= 5:  # audio clips (B, 3, 1, 128, 204) and video views (B, 15, 3, 2, 224, 224)
            views = x.shape[1]
            x = x.reshape(b * views, *x.shape[2:])
        m = self.imagebind
        inputs = m.modality_preprocessors[key](**{key: x})
        return m.modality_trunks[key](**inputs["trunk"]), inputs["head"], b, views

    @torch.inference_mode()
    def embed(self, modality: InputModality, batch: torch.Tensor) -> torch.Tensor:
        """ImageBind embeddings (B, 1024): vision L2-normalised; audio L2-normalised WITHOUT upstream's x20 scale
        (the release's copy of ImageBind applies only the normalisation); clips and crops averaged."""
        key = self._keys[modality]
        out, head_inputs, b, views = self._trunk(modality, batch)
        m = self.imagebind
        out = m.modality_heads[key](out, **head_inputs)
        post = m.modality_postprocessors[key]
        out = post[0](out) if key == self._audio_key else post(out)
        return out.reshape(b, views, -1).mean(dim=1).float()

    @torch.inference_mode()
    def tokens(self, modality: InputModality, batch: torch.Tensor) -> torch.Tensor:
        """Token-level features (B, T, 1024): every trunk token through the head's norm and projection (the
        pooled vector is the first token's), L2-normalised; the views of a clip averaged token by token, as the
        pooled path averages their vectors."""
        out, _, b, views = self._trunk(modality, batch)
        out = token_features(self.imagebind, self._keys[modality], out)
        return out.reshape(b, views, *out.shape[1:]).mean(dim=1).float()

    @torch.inference_mode()
    def project(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Each item's features -> its LLM input tokens, (items, tokens_per_item, hidden)."""
        x = pad_tokens(features).to(device=self.device, dtype=self.dtype)
        return project_media(self.projection, x).float().cpu()


def pad_tokens(features: list[torch.Tensor]) -> torch.Tensor:
    """Stack items' features; token features of different lengths (pictures vs sounds) are zero-padded."""
    if features[0].ndim == 1:
        return torch.stack(features)
    longest = max(f.shape[0] for f in features)
    return torch.stack([F.pad(f, (0, 0, 0, longest - f.shape[0])) for f in features])


def load_input_projection(bundle: Bundle) -> nn.Module:
    """The bundle's input projection, in the design its manifest names, weights loaded strictly."""
    spec = bundle.manifest.encoder
    state = load_file(str(bundle.path(spec.input_projection)))
    projection = build_input_projection(spec.projection, spec.config.out_embed_dim, bundle.manifest.llm.hidden_size)
    projection.load_state_dict(state, strict=True)
    return projection
