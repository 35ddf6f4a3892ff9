"""Evenly spread clips over a file, as pytorchvideo's ConstantClipsPerVideoSampler places them."""

from __future__ import annotations

from fractions import Fraction


def clip_windows(duration_s: float, clip_s: int, clips: int) -> list[tuple[Fraction, Fraction]]:
    """(start, end) in seconds of each clip; a file shorter than one clip gives full-length clips."""
    last_start = Fraction(max(Fraction(duration_s) - clip_s, 0))
    step = last_start / max(clips - 1, 1)
    return [(step * i, step * i + clip_s) for i in range(clips)]
