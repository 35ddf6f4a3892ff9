"""Facts of the NExT-GPT release (``7b_tiva_v0``) that the converter and the tiny builder both honour."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from services.contracts.bundle_manifest import DecoderDefaults, GenerationDefaults

MEDIA_START, MEDIA_END = "<Img>", "</Img>"
SIGNAL_COUNTS = {"image": ("IMG", 4), "video": ("VID", 24), "audio": ("AUD", 8)}
STOP_STRING = "###"

# Checkpoint prefixes of the three output projectors (``gen_text_hidden_fcs*.0.``).
PROJECTOR_PREFIXES = {
    "image": "gen_text_hidden_fcs.0.",
    "video": "gen_text_hidden_fcs_video.0.",
    "audio": "gen_text_hidden_fcs_audio.0.",
}
PROJECTOR_HEADS = 4
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_ALPHA = 32

DECODER_HUB_IDS = {
    "image": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "video": "cerspense/zeroscope_v2_576w",
    "audio": "cvssp/audioldm-l-full",
}
# The demo's values: 50 steps, guidance 7.5, SD at 512 px, ZeroScope 320x576 x 24 frames at 8 fps, 9 s audio.
DECODER_DEFAULTS = {
    "image": DecoderDefaults(steps=50, guidance_scale=7.5, height=512, width=512),
    "video": DecoderDefaults(steps=50, guidance_scale=7.5, height=320, width=576, frames=24, fps=8),
    "audio": DecoderDefaults(steps=50, guidance_scale=7.5, seconds=9.0, sample_rate=16000),
}
GENERATION_DEFAULTS = GenerationDefaults(max_new_tokens=246, temperature=1.0, top_p=0.01, top_k=50)


def signal_tokens(modality: str) -> list[str]:
    prefix, count = SIGNAL_COUNTS[modality]
    return [f"[{prefix}{i}]" for i in range(count)]


def added_tokens() -> list[str]:
    """The 38 tokens the release adds to Vicuna, in the release's order."""
    return [MEDIA_START, MEDIA_END, *signal_tokens("image"), *signal_tokens("video"), *signal_tokens("audio")]


def add_release_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Add the 38 tokens as the release does (plain, not special), checking each encodes to one id."""
    tokenizer.add_tokens([t for t in added_tokens() if t not in tokenizer.get_vocab()])
    for token in added_tokens():
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{token!r} encodes to {ids}, expected one id")
