"""Small media files made in memory, for encoder tests."""

from __future__ import annotations

import io

import av
import numpy as np
import soundfile
from PIL import Image


def png(width: int = 320, height: int = 240, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(width: int = 300, height: int = 400, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def wav(seconds: float = 3.0, rate: int = 16000, channels: int = 1, seed: int = 0, fmt: str = "WAV") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    samples = (rng.standard_normal((int(seconds * rate), channels)) * 0.1).astype(np.float32)
    soundfile.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


def mp4(frames: int = 40, fps: int = 8, width: int = 96, height: int = 64, pattern: str = "index") -> bytes:
    """H.264 frames; with pattern 'index' frame i is a flat grey of value 5*i (readable back after decoding),
    'flat' one grey throughout (compresses to almost nothing), otherwise noise."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            if pattern == "index":
                pixels = np.full((height, width, 3), min(5 * i, 255), np.uint8)
            elif pattern == "flat":
                pixels = np.full((height, width, 3), 90, np.uint8)
            else:
                pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
