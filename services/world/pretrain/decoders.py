"""The three decoders' stand-ins, trained as diffusers pipelines of the release's classes.

Per modality: a VAE (pictures 64x64 -> 4x16x16 latents; the audio decoder's log-mel 100x64 -> 4x25x16), a text
encoder (CLIP for StableDiffusion and TextToVideoSD, CLAP for AudioLDM) first bound contrastively to its
modality (as CLIP and CLAP are trained) and then frozen while the UNet learns by the denoising loss, with 10% of
captions dropped to "" for classifier-free guidance as SD trains, and for audio a
HiFi-GAN vocoder trained on multi-resolution spectral losses. The pipelines then draw the world from a caption
through their own text encoder, and from ``prompt_embeds`` exactly as the serving workers call them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AudioLDMPipeline, AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, TextToVideoSDPipeline,
    UNet2DConditionModel, UNet3DConditionModel,
)
from torch import nn
from transformers import (
    ClapTextConfig, ClapTextModelWithProjection, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, RobertaTokenizer,
    SpeechT5HifiGan, SpeechT5HifiGanConfig,
)

from services.world.attributes import AUDIO_RATE, all_captions
from services.world.dataset import WorldSplit
from services.world.pretrain.audio_features import HOP, MEL_BINS, log_mel
from services.world.pretrain.loop import LoopConfig, device, local_shard, train_part
from services.world.pretrain.text_tokenizers import (
    write_world_clip_tokenizer_files, write_world_roberta_tokenizer_files,
)

log = logging.getLogger(__name__)

# Conditioning widths (the projectors' output widths); distinct so that a modality mix-up fails on shape.
WORLD_COND_DIMS = {"image": 64, "video": 80, "audio": 32}
CFG_DROPOUT = 0.1
_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# Stable Diffusion's schedule, epsilon prediction. Its last training step still keeps sqrt(0.0047) = 7% of the
# clean latent, which sampling (from pure noise) never has.
EPSILON = dict(_BETAS, prediction_type="epsilon")
# Zero terminal SNR with v-prediction and trailing timesteps (Lin et al., "Common Diffusion Noise Schedules and
# Sample Steps are Flawed"). With SD's schedule the clip UNet read the motion out of that 7% leak: its loss was
# the same with the caption's direction reversed at every timestep (right 0.0099 = reversed 0.0099 at t=950,
# 48 fresh clips), so from pure noise the shapes moved wherever the noise put them. At zero terminal SNR the
# first step has nothing to read but the caption.
ZERO_SNR = dict(_BETAS, prediction_type="v_prediction", rescale_betas_zero_snr=True)
SCHEDULES = {"image": EPSILON, "video": ZERO_SNR, "audio": EPSILON}


def training_scheduler(modality: str) -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULES[modality])


def denoising_target(schedule: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict from ``schedule.add_noise(x0, noise, t)``: the noise, or the velocity."""
    if schedule.config.prediction_type == "v_prediction":
        return schedule.get_velocity(x0, noise, t)
    return noise


def inference_scheduler(modality: str) -> DDIMScheduler:
    schedule = SCHEDULES[modality]
    spacing = "trailing" if schedule.get("rescale_betas_zero_snr") else "leading"
    return DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing=spacing)


def world_vae(channels: int) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64, 64], in_channels=channels, out_channels=channels, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4, norm_num_groups=16,
    )


def world_clip(work: Path, dim: int) -> tuple[CLIPTextModel, CLIPTokenizer]:
    vocab, merges = write_world_clip_tokenizer_files(work)
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=77)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eos, pad_token_id=eos,
        hidden_size=dim, intermediate_size=2 * dim, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=77,
    ))
    return encoder, tokenizer


def world_clap(work: Path, dim: int) -> tuple[ClapTextModelWithProjection, RobertaTokenizer]:
    vocab, merges = write_world_roberta_tokenizer_files(work)
    tokenizer = RobertaTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=77)
    encoder = ClapTextModelWithProjection(ClapTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=dim,
        max_position_embeddings=80,
    ))
    return encoder, tokenizer


def world_vocoder() -> SpeechT5HifiGan:
    # 16 kHz and an upsampling product of 160 give the 100 mel frames per second the pipeline assumes.
    return SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=MEL_BINS, sampling_rate=AUDIO_RATE, upsample_initial_channel=64, upsample_rates=[8, 5, 4],
        upsample_kernel_sizes=[16, 10, 8], resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3], [1, 3]],
        normalize_before=False,
    ))


def picture_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float() / 127.5 - 1.0
    return x.movedim(-1, -3)


def audio_tensor(waves: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(waves.astype(np.float32) / 32767.0)


# ---------------------------------------------------------------- VAEs


def train_vae(name: str, vae: AutoencoderKL, batches: torch.Tensor, cfg: LoopConfig, workdir: Path,
              batch_size: int = 32, kl_weight: float = 1e-6, progress: bool = True) -> AutoencoderKL:
    """Reconstruction (MSE) + a small KL, then ``scaling_factor`` set so that latents have unit variance."""

    def step_loss(generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = batches[local_shard(torch.randint(len(batches), (batch_size,), generator=generator))].to(device())
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device())
        rec = vae.decode(z).sample
        return {"recon": F.mse_loss(rec, x), "kl": kl_weight * posterior.kl().mean()}

    train_part(name, vae, step_loss, cfg, workdir, progress=progress)
    with torch.inference_mode():
        sample = batches[: min(512, len(batches))]
        std = float(torch.cat([vae.encode(sample[i:i + 64]).latent_dist.mean for i in range(0, len(sample), 64)]).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae.eval()


@torch.inference_mode()
def encode_latents(vae: AutoencoderKL, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    parts = [vae.encode(x[i:i + batch]).latent_dist.mean for i in range(0, len(x), batch)]
    return torch.cat(parts) * vae.config.scaling_factor


# ---------------------------------------------------------------- denoisers


class Denoiser(nn.Module):
    """A UNet and its text encoder, trained together by the denoising loss."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder


def caption_tokens(tokenizer: Any, captions: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt"))


def condition(modality: str, text_encoder: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the pipeline computes from a caption: CLIP's last hidden states, or CLAP's normalised projection."""
    if modality == "audio":
        out = text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds
        return F.normalize(out, dim=-1)
    return text_encoder(tokens["input_ids"])[0]


def train_denoiser(modality: str, denoiser: Denoiser, tokenizer: Any, latents: torch.Tensor, captions: list[str],
                   cfg: LoopConfig, workdir: Path, batch_size: int, progress: bool = True,
                   train_text: bool = True) -> Denoiser:
    """MSE to the modality's schedule target (epsilon, or velocity at zero terminal SNR) over the DDPM schedule
    the inference scheduler shares; 10% of captions -> "".
    ``train_text=False`` keeps a pretrained text encoder frozen, as AudioLDM keeps CLAP."""
    vocabulary = all_captions(modality) + [""]
    index = torch.tensor([vocabulary.index(c) for c in captions])
    uncond = len(vocabulary) - 1
    tokens = caption_tokens(tokenizer, vocabulary)
    noise_schedule = training_scheduler(modality)
    v_prediction = noise_schedule.config.prediction_type == "v_prediction"
    denoiser.text_encoder.requires_grad_(train_text)
    frozen = None
    if not train_text:  # a frozen tower gives the same conditions every step: compute them once
        with torch.inference_mode():
            frozen = condition(modality, denoiser.text_encoder.to(device()).eval(),
                               {k: v.to(device()) for k, v in tokens.items()}).clone()

    def step_loss(generator: torch.Generator) -> dict[str, torch.Tensor]:
        pick = torch.randint(len(latents), (batch_size,), generator=generator)
        dropped = torch.rand(batch_size, generator=generator) < CFG_DROPOUT
        noise = torch.randn((batch_size, *latents.shape[1:]), generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch_size,), generator=generator)
        mine = local_shard(torch.arange(batch_size))
        pick, dropped, noise, t = pick[mine], dropped[mine], noise[mine], t[mine]
        x0, noise, t = latents[pick].to(device()), noise.to(device()), t.to(device())
        which = index[pick].clone()
        which[dropped] = uncond
        cond = frozen[which] if frozen is not None else \
            condition(modality, denoiser.text_encoder, {k: v.to(device()) for k, v in tokens.items()})[which]
        noisy = noise_schedule.add_noise(x0, noise, t)
        if modality == "audio":
            pred = denoiser.unet(noisy, t, encoder_hidden_states=None, class_labels=cond).sample
        else:
            pred = denoiser.unet(noisy, t, encoder_hidden_states=cond).sample
        return {"v" if v_prediction else "eps": F.mse_loss(pred, denoising_target(noise_schedule, x0, noise, t))}

    train_part(f"{modality}-unet", denoiser, step_loss, cfg, workdir, progress=progress)
    return denoiser.eval()


def image_unet(dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(48, 96), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=dim, norm_num_groups=24, attention_head_dim=8,
    )


def video_unet(dim: int) -> UNet3DConditionModel:
    # Narrower than the picture UNet: a clip is 8 latents, and a 2-core CPU trains it in about half an hour.
    return UNet3DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types=("CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=dim, attention_head_dim=8, norm_num_groups=16,
    )


def audio_unet(dim: int) -> UNet2DConditionModel:
    # AudioLDM conditions through the class embedding (FiLM on the time embedding), not cross-attention.
    return UNet2DConditionModel(
        block_out_channels=(48, 96), layers_per_block=1, norm_num_groups=16, sample_size=16,
        in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D", cross_attention_dim=dim, class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=dim, class_embeddings_concat=True,
    )


# ---------------------------------------------------------------- CLAP


class MelEncoder(nn.Module):
    """The audio tower of the CLAP stand-in: log-mel (frames, bins) -> a unit vector in the text space."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, dim))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(mel), dim=-1)


class Clap(nn.Module):
    def __init__(self, text_encoder: nn.Module, dim: int) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.audio = MelEncoder(dim)
        self.log_scale = nn.Parameter(torch.tensor(2.6))


def pretrain_clap(text_encoder: ClapTextModelWithProjection, tokenizer: Any, mels: torch.Tensor, captions: list[str],
                  cfg: LoopConfig, workdir: Path, batch_size: int = 64, progress: bool = True) -> None:
    """CLAP is a contrastive audio-text model; its stand-in's text tower is bound to sounds the same way (InfoNCE
    of log-mels against every caption), so that captions land apart before the UNet learns to follow them. Trained
    jointly with the UNet from scratch instead, the normalised embeddings collapse onto one point."""
    vocabulary = all_captions("audio")
    index = torch.tensor([vocabulary.index(c) for c in captions])
    tokens = caption_tokens(tokenizer, vocabulary)
    clap = Clap(text_encoder, text_encoder.config.projection_dim)

    def step_loss(generator: torch.Generator) -> dict[str, torch.Tensor]:
        pick = local_shard(torch.randint(len(mels), (batch_size,), generator=generator))
        text = condition("audio", clap.text_encoder, {k: v.to(device()) for k, v in tokens.items()})
        audio = clap.audio(mels[pick].to(device()))
        logits = clap.log_scale.exp() * audio @ text.T
        return {"infonce": F.cross_entropy(logits, index[pick].to(device()))}

    train_part("clap", clap, step_loss, cfg, workdir, progress=progress)
    text_encoder.eval()


# ---------------------------------------------------------------- CLIP


class PictureTower(nn.Module):
    """The picture side of the CLIP stand-in: (C, 64, 64) in [-1, 1] -> a unit vector in the text space. A clip
    is given as its first and last frames stacked (C = 6): where the shape went is the motion its caption names."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GELU(), nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.GELU(), nn.Flatten(), nn.Linear(64 * 4 * 4, dim))

    def forward(self, pictures: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(pictures), dim=-1)


class Clip(nn.Module):
    def __init__(self, text_encoder: nn.Module, channels: int, dim: int) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.pictures = PictureTower(channels, dim)
        self.log_scale = nn.Parameter(torch.tensor(2.6))


def pretrain_clip(modality: str, text_encoder: CLIPTextModel, tokenizer: Any, pictures: torch.Tensor,
                  captions: list[str], cfg: LoopConfig, workdir: Path, batch_size: int = 64,
                  progress: bool = True) -> None:
    """SD's and ZeroScope's CLIP text towers come from contrastive image-text training; their stand-ins are bound
    to pictures the same way (InfoNCE of pictures against every caption, the text side at CLIP's pooled EOS state)
    and then frozen. Trained jointly with the UNet from scratch instead, captions that differ in one word (the
    shape) came out nearly identical (cosine 0.99) and the UNet drew shapes at chance."""
    vocabulary = all_captions(modality)
    index = torch.tensor([vocabulary.index(c) for c in captions])
    tokens = caption_tokens(tokenizer, vocabulary)
    clip = Clip(text_encoder, pictures.shape[1], text_encoder.config.hidden_size)

    def step_loss(generator: torch.Generator) -> dict[str, torch.Tensor]:
        pick = local_shard(torch.randint(len(pictures), (batch_size,), generator=generator))
        text = F.normalize(clip.text_encoder(tokens["input_ids"].to(device())).pooler_output, dim=-1)
        seen = clip.pictures(pictures[pick].to(device()))
        logits = clip.log_scale.exp() * seen @ text.T
        return {"infonce": F.cross_entropy(logits, index[pick].to(device()))}

    train_part(f"{modality}-clip", clip, step_loss, cfg, workdir, progress=progress)
    text_encoder.eval()


# ---------------------------------------------------------------- vocoder


def _stft_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    total = pred.new_zeros(())
    for n_fft, hop in ((128, 32), (512, 128), (1024, 256)):
        window = torch.hann_window(n_fft, device=pred.device)
        p = torch.stft(pred, n_fft, hop, window=window, return_complex=True).abs()
        t = torch.stft(target, n_fft, hop, window=window, return_complex=True).abs()
        convergence = torch.linalg.norm(t - p) / torch.linalg.norm(t).clamp(min=1e-6)
        total = total + convergence + F.l1_loss(torch.log(p + 1e-5), torch.log(t + 1e-5))
    return total / 3


def train_vocoder(vocoder: SpeechT5HifiGan, waves: torch.Tensor, cfg: LoopConfig, workdir: Path,
                  batch_size: int = 16, crop_frames: int = 32, progress: bool = True) -> SpeechT5HifiGan:
    """Mel -> waveform on random crops, multi-resolution STFT + log-mel L1 (no adversary: tones need none)."""
    mels = log_mel(waves)  # (N, frames, mel)

    def step_loss(generator: torch.Generator) -> dict[str, torch.Tensor]:
        pick = local_shard(torch.randint(len(waves), (batch_size,), generator=generator))
        start = int(torch.randint(0, mels.shape[1] - crop_frames + 1, (1,), generator=generator))
        mel = mels[pick, start:start + crop_frames].to(device())
        target = waves[pick, start * HOP:(start + crop_frames) * HOP].to(device())
        pred = vocoder(mel)
        return {"stft": _stft_loss(pred, target), "mel": F.l1_loss(log_mel(pred), mel)}

    train_part("vocoder", vocoder, step_loss, cfg, workdir, progress=progress)
    return vocoder.eval()


# ---------------------------------------------------------------- the three pipelines


def pretrain_picture_vae(splits: dict[str, WorldSplit], cfg: LoopConfig, workdir: Path,
                         progress: bool = True) -> AutoencoderKL:
    """One VAE for pictures and clip frames (TextToVideoSD decodes frame by frame with a 2D VAE)."""
    torch.manual_seed(cfg.seed)
    frames = [picture_tensor(splits["image"].data)] if "image" in splits else []
    if "video" in splits:
        frames.append(picture_tensor(splits["video"].data[:, ::3].reshape(-1, 64, 64, 3)))
    return train_vae("picture-vae", world_vae(3), torch.cat(frames), cfg, workdir, progress=progress)


def pretrain_image(split: WorldSplit, vae: AutoencoderKL, cfgs: dict[str, LoopConfig], workdir: Path, out: Path,
                   batch_size: int = 32, progress: bool = True) -> StableDiffusionPipeline:
    """The CLIP text tower bound to pictures, then the UNet with that tower frozen."""
    torch.manual_seed(cfgs["unet"].seed)
    text_encoder, tokenizer = world_clip(workdir / "tokenizer", WORLD_COND_DIMS["image"])
    pictures = picture_tensor(split.data)
    pretrain_clip("image", text_encoder, tokenizer, pictures, split.captions, cfgs["clip"], workdir / "clip",
                  progress=progress)
    latents = encode_latents(vae, pictures)
    denoiser = train_denoiser("image", Denoiser(image_unet(WORLD_COND_DIMS["image"]), text_encoder), tokenizer,
                              latents, split.captions, cfgs["unet"], workdir, batch_size, progress, train_text=False)
    pipe = StableDiffusionPipeline(
        unet=denoiser.unet, vae=vae, text_encoder=denoiser.text_encoder, tokenizer=tokenizer,
        scheduler=inference_scheduler("image"), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return pipe


def pretrain_video(split: WorldSplit, vae: AutoencoderKL, cfgs: dict[str, LoopConfig], workdir: Path, out: Path,
                   batch_size: int = 8, progress: bool = True) -> TextToVideoSDPipeline:
    """The CLIP text tower bound to clips (first and last frames), then the UNet with that tower frozen."""
    torch.manual_seed(cfgs["unet"].seed)
    text_encoder, tokenizer = world_clip(workdir / "tokenizer", WORLD_COND_DIMS["video"])
    n, f = split.data.shape[:2]
    ends = picture_tensor(split.data[:, [0, -1]])  # (N, 2, 3, 64, 64)
    pretrain_clip("video", text_encoder, tokenizer, ends.reshape(n, 6, 64, 64), split.captions, cfgs["clip"],
                  workdir / "clip", progress=progress)
    frames = encode_latents(vae, picture_tensor(split.data.reshape(n * f, 64, 64, 3)))
    latents = frames.reshape(n, f, *frames.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()  # (N, C, F, h, w)
    denoiser = train_denoiser("video", Denoiser(video_unet(WORLD_COND_DIMS["video"]), text_encoder), tokenizer,
                              latents, split.captions, cfgs["unet"], workdir, batch_size, progress, train_text=False)
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=denoiser.text_encoder, tokenizer=tokenizer,
                                 unet=denoiser.unet, scheduler=inference_scheduler("video"))
    pipe.save_pretrained(str(out), safe_serialization=True)
    return pipe


def pretrain_audio(split: WorldSplit, cfgs: dict[str, LoopConfig], workdir: Path, out: Path,
                   batch_size: int = 64, progress: bool = True) -> AudioLDMPipeline:
    """VAE on log-mel pictures (1, 100, 64), vocoder mel -> wave, the CLAP text tower bound to sounds, then the
    class-conditioned UNet with that text tower frozen."""
    torch.manual_seed(cfgs["vae"].seed)
    waves = audio_tensor(split.data)
    mels = log_mel(waves).unsqueeze(1)  # (N, 1, frames, mel)
    vae = train_vae("audio-vae", world_vae(1), mels, cfgs["vae"], workdir / "vae", progress=progress)
    vocoder = train_vocoder(world_vocoder(), waves, cfgs["vocoder"], workdir / "vocoder", progress=progress)
    text_encoder, tokenizer = world_clap(workdir / "tokenizer", WORLD_COND_DIMS["audio"])
    pretrain_clap(text_encoder, tokenizer, mels, split.captions, cfgs["clap"], workdir / "clap", progress=progress)
    latents = encode_latents(vae, mels)
    denoiser = train_denoiser("audio", Denoiser(audio_unet(WORLD_COND_DIMS["audio"]), text_encoder), tokenizer,
                              latents, split.captions, cfgs["unet"], workdir / "unet", batch_size, progress,
                              train_text=False)
    pipe = AudioLDMPipeline(vae=vae, text_encoder=denoiser.text_encoder, tokenizer=tokenizer, unet=denoiser.unet,
                            scheduler=inference_scheduler("audio"), vocoder=vocoder)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return pipe
