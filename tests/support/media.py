"""Small media files made in memory, for encoder tests."""

from __future__ import annotations

import io
import struct

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


def smooth(width: int = 320, height: int = 240) -> np.ndarray:
    """A picture lossy codecs keep close to as it is: colour ramps, no noise."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1).astype(np.uint8)


def still(fmt: str, pixels: np.ndarray | None = None) -> bytes:
    """``pixels`` (default: ``smooth()``) saved as ``fmt``: "HEIF" (a phone's HEIC, through pillow-heif), "AVIF",
    "PNG"..."""
    if fmt == "HEIF":
        from pillow_heif import register_heif_opener

        register_heif_opener()
    buf = io.BytesIO()
    Image.fromarray(smooth() if pixels is None else pixels).save(buf, format=fmt, **(
        {"quality": 95} if fmt in ("HEIF", "AVIF") else {}))
    return buf.getvalue()


def animation(fmt: str, frames: np.ndarray, ms_per_frame: int = 125) -> bytes:
    """``frames`` (n, height, width, 3) as an animated "GIF" or "PNG" (APNG), looping."""
    buf = io.BytesIO()
    first, *rest = [Image.fromarray(f) for f in frames]
    first.save(buf, format=fmt, save_all=True, append_images=rest, duration=ms_per_frame, loop=0)
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
    def pixels(i: int) -> np.ndarray:
        if pattern == "index":
            return np.full((height, width, 3), min(5 * i, 255), np.uint8)
        if pattern == "flat":
            return np.full((height, width, 3), 90, np.uint8)
        return np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)

    return mp4_of(np.stack([pixels(i) for i in range(frames)]), fps)


def mp4_of(frames: np.ndarray, fps: int = 8) -> bytes:
    """H.264 of ``frames``, uint8 (n, height, width, 3)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def shown_turned_clockwise(data: bytes) -> bytes:
    """The MP4 ``data`` with its track's display matrix set to a quarter turn clockwise, as a phone writes a
    portrait clip it filmed as landscape frames (PyAV writes no display matrix: the track header is patched)."""
    identity = struct.pack(">9i", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    at = data.index(identity, data.index(b"tkhd"))
    return data[:at] + struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000) + data[at + 36:]


def tone(seconds: float = 2.0, rate: int = 16000, hz: float = 880.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def encoded_audio(wave: np.ndarray, rate: int, fmt: str) -> bytes:
    """Mono sound the way phones and browsers send it: 'm4a' (AAC in MP4), 'webm' (Opus in WebM, at 48 kHz as
    Opus requires: ``rate`` must be 48000), 'adts' (raw AAC)."""
    codec, container_format = {"m4a": ("aac", "ipod"), "webm": ("libopus", "webm"), "adts": ("aac", "adts")}[fmt]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        size = stream.codec_context.frame_size or 1024
        samples = np.concatenate([wave, np.zeros(-len(wave) % size, np.float32)])[None]
        plane = "fltp" if codec == "aac" else "flt"
        for start in range(0, samples.shape[1], size):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + size]), format=plane,
                                               layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


# The D50 colorants of sRGB's primaries (what an sRGB ICC profile's rXYZ/gXYZ/bXYZ tags hold).
SRGB_COLORANTS = {"r": (0.4361, 0.2225, 0.0139), "g": (0.3851, 0.7169, 0.0971), "b": (0.1431, 0.0606, 0.7141)}


def icc_profile(colorants: dict[str, tuple[float, float, float]], gamma: float = 2.2,
                name: str = "test RGB") -> bytes:
    """A minimal ICC v2 display profile (matrix and gamma curves), built byte by byte: no profile file is on this
    machine, and Pillow creates only sRGB, Lab and XYZ ones. Swapping colorants makes a space whose stored red is
    another colour, so a test can tell whether a reader applied the profile."""
    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(v: tuple[float, float, float]) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(s15(c) for c in v)

    text = name.encode("ascii") + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 4 + b"\0" * 4 + b"\0" * 2 + b"\0" + \
        b"\0" * 67
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    tags = [(b"desc", desc), (b"wtpt", xyz((0.9642, 1.0, 0.8249))), (b"rXYZ", xyz(colorants["r"])),
            (b"gXYZ", xyz(colorants["g"])), (b"bXYZ", xyz(colorants["b"])), (b"rTRC", curve), (b"gTRC", curve),
            (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = struct.pack(">I", size) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + b"\0" * 12 + \
        b"acsp" + b"\0" * 28 + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data
