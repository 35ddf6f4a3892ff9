"""The log-mel representation the audio decoder works in: what its VAE encodes and its vocoder turns into sound.

AudioLDM's pipeline decodes latents to a (frames, mel bins) picture and hands it to its vocoder; both are ours
here, so this one function defines the picture for both. 100 frames per second (hop 160 at 16 kHz), as the
pipeline assumes from the vocoder's upsampling product.
"""

from __future__ import annotations

import functools

import torch
from transformers.audio_utils import mel_filter_bank

from services.world.attributes import AUDIO_RATE

MEL_BINS = 64
HOP = 160
N_FFT = 1024
LOG_FLOOR = 1e-5
# Affine map of log-mel values into about [-1, 1]: silence (log 1e-5 = -11.5) -> -1.
LOG_OFFSET, LOG_SCALE = 5.75, 5.75


@functools.cache
def _filters() -> torch.Tensor:
    bank = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=MEL_BINS, min_frequency=0.0,
                           max_frequency=AUDIO_RATE / 2, sampling_rate=AUDIO_RATE, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(bank).float()  # (freq, mel)


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """(B, samples) -> (B, samples // HOP, MEL_BINS), scaled to about [-1, 1]."""
    spec = torch.stft(wave, N_FFT, HOP, window=torch.hann_window(N_FFT, device=wave.device), center=True,
                      return_complex=True).abs()  # (B, freq, frames + 1)
    mel = torch.einsum("bft,fm->btm", spec, _filters().to(wave.device))
    frames = wave.shape[-1] // HOP
    return (torch.log(mel.clamp(min=LOG_FLOOR))[:, :frames] + LOG_OFFSET) / LOG_SCALE
