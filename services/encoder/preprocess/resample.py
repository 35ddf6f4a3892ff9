"""Band-limited resampling by a windowed sinc (Hann window), the method ImageBind's loader uses through
torchaudio's ``resample`` defaults (6 zero crossings, roll-off 0.99).

That polyphase filter bank holds one filter per output phase: its size grows with the rates' reduced ratio
(44.1 -> 16 kHz: 160 phases; 4001 Hz -> 16 kHz: 16000 phases of 4000 taps, gigabytes). Beyond a bounded size the
conversion goes to libsoxr instead, whose memory does not depend on the ratio."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

ZERO_CROSSINGS = 6
ROLLOFF = 0.99
MAX_FILTER_BANK = 1 << 20  # float32 entries (4 MiB): every common rate pair is far below


def _kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    base = min(orig, new) * ROLLOFF
    width = math.ceil(ZERO_CROSSINGS * orig / base)
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    # One filter per output phase: output sample j sits at input time j / new.
    t = (-torch.arange(new, dtype=torch.float64)[:, None] / new + taps[None, :]) * base
    t = t.clamp(-ZERO_CROSSINGS, ZERO_CROSSINGS)
    window = torch.cos(t * math.pi / ZERO_CROSSINGS / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (sinc * window * (base / orig)).to(torch.float32), width


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Resample (channels, samples) from ``orig_rate`` to ``new_rate``."""
    if orig_rate == new_rate:
        return wave
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    taps = 2 * math.ceil(ZERO_CROSSINGS * orig / (min(orig, new) * ROLLOFF)) + orig
    if new * taps > MAX_FILTER_BANK:
        import soxr

        out = soxr.resample(wave.numpy().T, orig_rate, new_rate, quality="HQ")  # (samples, channels)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(out, dtype=np.float32).reshape(len(out), -1).T))
    kernel, width = _kernel(orig, new)
    channels, length = wave.shape
    padded = F.pad(wave.reshape(channels, 1, length), (width, width + orig))
    out = F.conv1d(padded, kernel[:, None, :], stride=orig)  # (channels, new, frames)
    out = out.transpose(1, 2).reshape(channels, -1)
    return out[:, : math.ceil(new * length / orig)]
