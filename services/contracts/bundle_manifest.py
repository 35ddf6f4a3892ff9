"""The versioned schema of ``bundle.json``, the manifest of a model bundle.

Every service reads only its part of the bundle; this manifest is the one place that says where each part is
and how it must be used (signal tokens, prompt layout, stop ids, hidden-state offset, decoder defaults).
Unknown keys are refused so that a typo in a hand-edited manifest cannot silently fall back to a default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUNDLE_SCHEMA_VERSION = 1
MANIFEST_FILE = "bundle.json"

Modality = Literal["image", "video", "audio"]
OUTPUT_MODALITIES: tuple[Modality, ...] = ("image", "video", "audio")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SignalSpec(_Strict):
    """The signal tokens of one output modality, as strings and as ids of the bundle's tokenizer."""

    tokens: list[str] = Field(min_length=1)
    token_ids: list[int] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_length(self) -> SignalSpec:
        if len(self.tokens) != len(self.token_ids):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.token_ids)} token_ids")
        if len(set(self.token_ids)) != len(self.token_ids):
            raise ValueError("token_ids must be distinct")
        return self


class ProjectorSpec(_Strict):
    """An output projector: fc(in->hidden) -> nn.Transformer over learned queries -> fc(hidden->out)."""

    weights: str
    signal_embeddings: str
    in_dim: int = Field(gt=0)
    hidden_dim: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_encoder_layers: int = Field(gt=0)
    num_decoder_layers: int = Field(gt=0)
    ffn_dim: int = Field(gt=0)
    num_queries: int = Field(gt=0)
    out_dim: int = Field(gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ProjectorSpec:
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        return self

    @property
    def output_shape(self) -> tuple[int, ...]:
        # A single query means a pooled vector (AudioLDM's CLAP embedding), not a sequence.
        return (self.out_dim,) if self.num_queries == 1 else (self.num_queries, self.out_dim)


class DecoderDefaults(_Strict):
    steps: int = Field(default=50, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=50.0)
    height: int | None = Field(default=None, ge=8)
    width: int | None = Field(default=None, ge=8)
    frames: int | None = Field(default=None, ge=1)
    fps: int | None = Field(default=None, ge=1)
    seconds: float | None = Field(default=None, gt=0)
    sample_rate: int | None = Field(default=None, ge=1000)


DecoderPipeline = Literal["stable_diffusion", "text_to_video_sd", "audioldm"]
PIPELINE_FOR_MODALITY: dict[str, DecoderPipeline] = {
    "image": "stable_diffusion",
    "video": "text_to_video_sd",
    "audio": "audioldm",
}
_REQUIRED_DEFAULTS: dict[str, tuple[str, ...]] = {
    "image": ("height", "width"),
    "video": ("height", "width", "frames", "fps"),
    "audio": ("seconds", "sample_rate"),
}


class DecoderSpec(_Strict):
    """A diffusers pipeline: a directory inside the bundle, or ``hub:<repo id>`` for weights kept elsewhere."""

    pipeline: DecoderPipeline
    source: str
    defaults: DecoderDefaults

    @property
    def is_hub(self) -> bool:
        return self.source.startswith("hub:")


class OutputSpec(_Strict):
    signal: SignalSpec
    projector: ProjectorSpec
    decoder: DecoderSpec


class LoraSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    path: str
    rank: int = Field(gt=0)


class LLMSpec(_Strict):
    path: str = "llm"
    architecture: Literal["llama"] = "llama"
    hidden_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_model_len: int = Field(default=2048, gt=0)
    loras: list[LoraSpec] = Field(default_factory=list)
    # The LoRA adapter that the reference applies to every request; None when it was merged into llm/.
    default_lora: str | None = None

    @model_validator(mode="after")
    def _default_lora_exists(self) -> LLMSpec:
        names = [lora.name for lora in self.loras]
        if len(set(names)) != len(names):
            raise ValueError("LoRA names must be distinct")
        if self.default_lora is not None and self.default_lora not in names:
            raise ValueError(f"default_lora {self.default_lora!r} is not one of the loras {names}")
        return self


class ImageBindConfig(_Strict):
    """Constructor arguments of ImageBind's ``ImageBindModel``; the defaults are ``imagebind_huge``."""

    out_embed_dim: int = 1024
    vision_embed_dim: int = 1280
    vision_num_blocks: int = 32
    vision_num_heads: int = 16
    text_embed_dim: int = 1024
    text_num_blocks: int = 24
    text_num_heads: int = 16
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    depth_embed_dim: int = 384
    depth_num_blocks: int = 12
    depth_num_heads: int = 8
    thermal_embed_dim: int = 768
    thermal_num_blocks: int = 12
    thermal_num_heads: int = 12
    imu_embed_dim: int = 512
    imu_num_blocks: int = 6
    imu_num_heads: int = 8
    audio_drop_path: float = 0.1
    imu_drop_path: float = 0.7


class InputProjectionSpec(_Strict):
    """How ImageBind's output becomes LLM input tokens.

    ``linear`` (the release): the pooled vector (out_embed_dim) -> one LLM token per item. ``group`` (the paper's
    design, GroupViT-style, as the newer NExT-GPT code has it): ImageBind's token-level features are grouped by
    learnable concept tokens, ``groups`` per stage (64 then 8 in the newer code), into ``groups[-1]`` LLM tokens
    per item."""

    kind: Literal["linear", "group"] = "linear"
    width: int = Field(default=512, gt=0)  # group: the grouping blocks' width (in_fc 1024 -> width)
    groups: list[int] = Field(default_factory=lambda: [64, 8])
    num_heads: int = Field(default=8, gt=0)

    @model_validator(mode="after")
    def _check(self) -> InputProjectionSpec:
        if self.kind == "group":
            if not self.groups or any(g <= 0 for g in self.groups):
                raise ValueError("group: groups must be positive counts, one per grouping stage")
            if self.width % self.num_heads:
                raise ValueError(f"group: width {self.width} is not divisible by num_heads {self.num_heads}")
        return self

    @property
    def tokens_per_item(self) -> int:
        return self.groups[-1] if self.kind == "group" else 1


class EncoderSpec(_Strict):
    architecture: Literal["imagebind"] = "imagebind"
    config: ImageBindConfig = Field(default_factory=ImageBindConfig)
    weights: str
    input_projection: str
    projection: InputProjectionSpec = Field(default_factory=InputProjectionSpec)
    modalities: list[Modality] = Field(default_factory=lambda: ["image", "audio", "video"])


class PromptSpec(_Strict):
    """The legacy NExT-GPT (Vicuna v0) prompt layout; see nextgpt-model-facts section 2."""

    template: Literal["vicuna_v0"] = "vicuna_v0"
    human_prefix: str = "### Human: "
    assistant_prefix: str = "\n### Assistant:"
    turn_separator: str = "\n###"
    media_start: str = "<Img>"
    media_start_id: int
    media_end: str = "</Img>"
    media_end_id: int
    bos_id: int
    # The reference demo embeds every text segment with its own BOS; training used one.
    bos_per_segment: bool = True


class StopSpec(_Strict):
    strings: list[str] = Field(min_length=1)
    token_ids: list[int] = Field(min_length=1)


class GenerationDefaults(_Strict):
    max_new_tokens: int = Field(default=246, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=0.01, gt=0.0, le=1.0)
    top_k: int = Field(default=50, ge=0)


class BundleManifest(_Strict):
    schema_version: Literal[1]
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    description: str = ""
    # Position of the hidden states fed to the projectors, relative to the signal tokens:
    # -1 reproduces the released demo (one position early), 0 matches training.
    hidden_state_offset: Literal[-1, 0] = -1
    llm: LLMSpec
    encoder: EncoderSpec
    prompt: PromptSpec
    stop: StopSpec
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)
    outputs: dict[Modality, OutputSpec]

    @model_validator(mode="after")
    def _consistent(self) -> BundleManifest:
        seen: dict[int, str] = {}
        for modality, spec in self.outputs.items():
            expected = PIPELINE_FOR_MODALITY[modality]
            if spec.decoder.pipeline != expected:
                raise ValueError(f"outputs.{modality}.decoder.pipeline must be {expected!r}")
            missing = [k for k in _REQUIRED_DEFAULTS[modality] if getattr(spec.decoder.defaults, k) is None]
            if missing:
                raise ValueError(f"outputs.{modality}.decoder.defaults is missing {missing}")
            if spec.projector.in_dim != self.llm.hidden_size:
                raise ValueError(
                    f"outputs.{modality}.projector.in_dim {spec.projector.in_dim} != llm.hidden_size "
                    f"{self.llm.hidden_size}"
                )
            for token_id in spec.signal.token_ids:
                if token_id in seen:
                    raise ValueError(f"signal token id {token_id} is used by {seen[token_id]} and {modality}")
                seen[token_id] = modality
        return self

    def signal_modality(self, token_id: int) -> Modality | None:
        """The modality whose signal group starts with ``token_id``, if any."""
        for modality, spec in self.outputs.items():
            if spec.signal.token_ids[0] == token_id:
                return modality
        return None
