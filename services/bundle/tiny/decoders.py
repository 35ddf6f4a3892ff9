"""Tiny diffusers pipelines (StableDiffusion, TextToVideoSD, AudioLDM) whose conditioning widths match the
tiny projectors. Cross-attention sits only at the low-resolution block: that keeps CPU runs to seconds."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AudioLDMPipeline,
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    TextToVideoSDPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from transformers import (
    ClapTextConfig,
    ClapTextModelWithProjection,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    RobertaTokenizer,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
)

from services.bundle.tiny.text_tokenizers import write_clip_tokenizer_files, write_roberta_tokenizer_files


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def _vae(channels: int) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=channels, out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4, norm_num_groups=16,
    )


def _clip(work: Path, dim: int) -> tuple[CLIPTextModel, CLIPTokenizer]:
    vocab, merges = write_clip_tokenizer_files(work)
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=77)
    encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=dim, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=514, max_position_embeddings=77,
    ))
    return encoder, tokenizer


def build_image_pipeline(out_dir: Path, work: Path, dim: int, seed: int) -> None:
    torch.manual_seed(seed)
    encoder, tokenizer = _clip(work / "clip-image", dim)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=dim, norm_num_groups=32, attention_head_dim=8,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=_vae(3), text_encoder=encoder, tokenizer=tokenizer, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out_dir), safe_serialization=True)


def build_video_pipeline(out_dir: Path, work: Path, dim: int, seed: int) -> None:
    torch.manual_seed(seed)
    encoder, tokenizer = _clip(work / "clip-video", dim)
    unet = UNet3DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"),
        cross_attention_dim=dim, attention_head_dim=8, norm_num_groups=32,
    )
    pipe = TextToVideoSDPipeline(vae=_vae(3), text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                 scheduler=_scheduler())
    pipe.save_pretrained(str(out_dir), safe_serialization=True)


def build_audio_pipeline(out_dir: Path, work: Path, dim: int, seed: int) -> None:
    torch.manual_seed(seed)
    vocab, merges = write_roberta_tokenizer_files(work / "roberta-audio")
    tokenizer = RobertaTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=77)
    encoder = ClapTextModelWithProjection(ClapTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=dim,
        max_position_embeddings=80,
    ))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, sample_size=32,
        in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(32, 64), class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=dim, class_embeddings_concat=True,
    )
    # 16 kHz and an upsampling product of 160 give 100 mel frames per second, as in AudioLDM.
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=16, sampling_rate=16000, upsample_initial_channel=32, upsample_rates=[8, 5, 4],
        upsample_kernel_sizes=[16, 10, 8], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        normalize_before=False,
    ))
    pipe = AudioLDMPipeline(vae=_vae(1), text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=_scheduler(), vocoder=vocoder)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
