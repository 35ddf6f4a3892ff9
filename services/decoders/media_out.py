"""Artifact encoding: PNG for images, H.264 MP4 for video, 16-bit PCM WAV for audio."""

from __future__ import annotations

import io

import numpy as np
import soundfile
from PIL import Image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(frames: np.ndarray, fps: int) -> bytes:
    """(F, H, W, 3) floats in [0, 1] -> H.264 yuv420p MP4 (dimensions padded to even, as 4:2:0 requires)."""
    import av  # only video needs PyAV (with its FFmpeg): an image or audio worker runs without loading it

    pixels = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    _, h, w, _ = pixels.shape
    pixels = np.pad(pixels, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = pixels.shape[2], pixels.shape[1], "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for frame in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, np.clip(audio, -1.0, 1.0).astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()
