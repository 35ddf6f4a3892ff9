"""What each decoder makes of a caption by itself: the L2 target of the signal groups (loaded once per modality)."""

from __future__ import annotations

from typing import Any

import torch

from services.bundle.loader import Bundle


class DecoderTextEncoders:
    """The bundle's decoders' own text encoders (CLIP for pictures and clips, CLAP for sounds), loaded on first use."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self._loaded: dict[str, tuple[Any, Any]] = {}

    @torch.inference_mode()
    def encode(self, modality: str, captions: list[str]) -> torch.Tensor:
        """(len(captions), ...) conditioning, as the pipeline computes it from the captions."""
        from transformers import AutoTokenizer, CLIPTextModel, ClapTextModelWithProjection

        from services.world.pretrain.decoders import caption_tokens, condition

        if modality not in self._loaded:
            source = self.bundle.decoder_source(modality)  # type: ignore[arg-type]
            cls = ClapTextModelWithProjection if modality == "audio" else CLIPTextModel
            self._loaded[modality] = (AutoTokenizer.from_pretrained(source, subfolder="tokenizer"),
                                      cls.from_pretrained(source, subfolder="text_encoder").eval())
        tokenizer, encoder = self._loaded[modality]
        return condition(modality, encoder, caption_tokens(tokenizer, captions)).clone()
