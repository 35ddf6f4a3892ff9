"""Audio: 16 kHz, 3 clips of 2 s, 128-bin Kaldi fbank, 204 frames, ImageBind's mean/std -> (3, 1, 128, 204)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import soundfile
import torch
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from services.contracts.errors import PayloadTooLargeError
from services.encoder.preprocess import MediaError, reason
from services.encoder.preprocess.clips import clip_windows
from services.encoder.preprocess.container_audio import decode_container_audio
from services.encoder.preprocess.resample import resample

SAMPLE_RATE = 16_000
CLIP_SECONDS = 2
CLIPS = 3
MEL_BINS = 128
TARGET_FRAMES = 204
FBANK_MEAN, FBANK_STD = -4.268, 9.138

# Kaldi fbank as ImageBind configures it: 25 ms Hann ("hanning", symmetric) windows every 10 ms, 512-point FFT,
# pre-emphasis 0.97, DC offset removed, power spectrum, Kaldi mel scale from 20 Hz to Nyquist, natural log.
_WINDOW = window_function(400, "hann", periodic=False)
with warnings.catch_warnings():
    # 128 bins over 257 FFT bins leaves the lowest filters empty; Kaldi has the same (all-floor) rows.
    warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
    _MEL = mel_filter_bank(num_frequency_bins=257, num_mel_filters=MEL_BINS, min_frequency=20,
                           max_frequency=SAMPLE_RATE // 2, sampling_rate=SAMPLE_RATE, norm=None, mel_scale="kaldi",
                           triangularize_in_mel_space=True)


def kaldi_fbank(wave: np.ndarray) -> np.ndarray:
    """(samples,) at 16 kHz -> (128, frames)."""
    return spectrogram(wave, _WINDOW, frame_length=400, hop_length=160, fft_length=512, power=2.0, center=False,
                       preemphasis=0.97, mel_filters=_MEL, log_mel="log", mel_floor=1.192092955078125e-07,
                       remove_dc_offset=True).astype(np.float32)


def clip_to_melspec(clip: torch.Tensor, name: str) -> torch.Tensor:
    """(channels, samples) -> (1, 128, 204), normalised."""
    # As the reference: the mean is removed over all channels, then Kaldi's fbank reads channel 0.
    wave = (clip - clip.mean())[0].numpy().astype(np.float64)
    if wave.shape[0] < 400:
        raise MediaError(f"{name}: audio is shorter than one 25 ms window", code="invalid_audio", param=name)
    fbank = torch.from_numpy(kaldi_fbank(wave))
    frames = fbank.shape[1]
    if frames < TARGET_FRAMES:
        fbank = torch.nn.functional.pad(fbank, (0, TARGET_FRAMES - frames))
    else:
        fbank = fbank[:, :TARGET_FRAMES]
    return ((fbank - FBANK_MEAN) / FBANK_STD).unsqueeze(0)


# Telephone audio to the highest studio rates; anything outside is a mistake or an attack on the resampler.
MIN_RATE, MAX_RATE = 1_000, 384_000


def decode_audio(data: bytes, name: str, max_seconds: float) -> tuple[torch.Tensor, int]:
    """(channels, samples) float32 in [-1, 1] and the sample rate. libsndfile reads WAV, FLAC, Ogg and MP3;
    anything else (M4A/AAC, WebM/Opus) is decoded by FFmpeg."""
    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception:
        wave, rate = decode_container_audio(data, name, max_seconds)
        _check_rate(rate, name)
        return _finite(wave, name), rate
    if info.frames <= 0 or info.samplerate <= 0:
        raise MediaError(f"{name}: audio has no samples", code="invalid_audio", param=name)
    _check_rate(info.samplerate, name)
    if info.frames / info.samplerate > max_seconds:
        raise PayloadTooLargeError(
            f"{name}: {info.frames / info.samplerate:.1f} s of audio exceeds the limit of {max_seconds:.0f} s",
            code="audio_too_long", param=name,
        )
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        raise MediaError(f"{name}: corrupt or truncated audio ({reason(exc)})", code="invalid_audio",
                         param=name) from exc
    if samples.shape[0] == 0:
        raise MediaError(f"{name}: audio has no samples", code="invalid_audio", param=name)
    return _finite(torch.from_numpy(np.ascontiguousarray(samples.T)), name), int(rate)


def _check_rate(rate: int, name: str) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise MediaError(f"{name}: a sample rate of {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz",
                         code="unsupported_sample_rate", param=name)


def _finite(wave: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(wave).all():
        raise MediaError(f"{name}: audio contains NaN or infinite samples", code="invalid_audio", param=name)
    return wave


def preprocess_audio(data: bytes, name: str, max_seconds: float) -> torch.Tensor:
    wave, rate = decode_audio(data, name, max_seconds)
    return wave_clips(resample(wave, rate, SAMPLE_RATE), name)


def wave_clips(wave: torch.Tensor, name: str) -> torch.Tensor:
    """(channels, samples) at 16 kHz -> (3, 1, 128, 204): the fbanks of its clips, spread evenly over it."""
    duration = wave.shape[1] / SAMPLE_RATE
    clips = []
    for start, end in clip_windows(duration, CLIP_SECONDS, CLIPS):
        clip = wave[:, int(start * SAMPLE_RATE): int(end * SAMPLE_RATE)]
        clips.append(clip_to_melspec(clip, name))
    return torch.stack(clips)
