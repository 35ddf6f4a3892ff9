"""Preprocessing against references computed here from the formulas (not by calling the code under test)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from services.contracts.errors import PayloadTooLargeError
from services.encoder.media import is_container, sniff
from services.encoder.preprocess import MediaError
from services.encoder.preprocess.audio import clip_to_melspec, decode_audio, preprocess_audio
from services.encoder.preprocess.container_audio import container_modality
from services.encoder.preprocess.clips import clip_windows
from services.encoder.preprocess.image import preprocess_image
from services.encoder.preprocess.resample import resample
from services.encoder.preprocess.video import preprocess_video
from tests.support import media

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.mark.parametrize(("w", "h"), [(320, 240), (240, 320), (224, 224), (1000, 230)])
def test_image_matches_resize_crop_normalize(w: int, h: int) -> None:
    data = media.png(w, h)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    short, long_ = min(w, h), max(w, h)
    new_long = int(224 * long_ / short)
    size = (224, new_long) if w <= h else (new_long, 224)
    resized = np.asarray(image.resize(size, Image.BICUBIC)).astype(np.float64) / 255
    top = int(round((resized.shape[0] - 224) / 2))
    left = int(round((resized.shape[1] - 224) / 2))
    expected = ((resized[top:top + 224, left:left + 224] - MEAN) / STD).transpose(2, 0, 1)
    got = preprocess_image(data, "x.png", 10**8).numpy()
    assert got.shape == (3, 224, 224)
    assert np.abs(got - expected).max() < 1e-5


def _kaldi_fbank_reference(wave: np.ndarray) -> np.ndarray:
    """Kaldi's fbank written out: 25/10 ms frames (snip edges), DC removal, pre-emphasis 0.97, symmetric Hann,
    512-point power spectrum, 128 triangular filters on the mel scale 1127 ln(1 + f/700) from 20 Hz to 8 kHz."""
    n_frames = 1 + (len(wave) - 400) // 160
    frames = np.stack([wave[i * 160: i * 160 + 400] for i in range(n_frames)]).astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    frames = np.concatenate([frames[:, :1] - 0.97 * frames[:, :1], frames[:, 1:] - 0.97 * frames[:, :-1]], axis=1)
    frames *= 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)
    power = np.abs(np.fft.rfft(frames, n=512)) ** 2  # (frames, 257)

    def mel(f: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)

    lo, hi = mel(20.0), mel(8000.0)
    delta = (hi - lo) / 129
    fft_mel = mel(np.arange(256) * 16000 / 512)
    banks = np.zeros((128, 257))
    for m in range(128):
        left, center, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        up = (fft_mel - left) / (center - left)
        down = (right - fft_mel) / (right - center)
        banks[m, :256] = np.maximum(0.0, np.minimum(up, down))
    energies = power @ banks.T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps)).T  # (128, frames)


def test_fbank_matches_kaldi_formulas() -> None:
    rng = np.random.default_rng(0)
    clip = torch.from_numpy((rng.standard_normal((1, 32000)) * 0.1).astype(np.float32))
    got = clip_to_melspec(clip, "a.wav")[0].numpy()
    wave = (clip - clip.mean())[0].numpy().astype(np.float64)
    ref = _kaldi_fbank_reference(wave)
    ref = np.pad(ref, ((0, 0), (0, 204 - ref.shape[1])))
    ref = (ref - (-4.268)) / 9.138
    assert got.shape == (128, 204)
    assert np.abs(got - ref).max() < 5e-4


def test_clip_windows_spread_evenly() -> None:
    assert clip_windows(5.0, 2, 3) == [(0, 2), (Fraction(3, 2), Fraction(7, 2)), (3, 5)]
    assert clip_windows(1.0, 2, 3) == [(0, 2)] * 3  # shorter than a clip: the whole file three times


def test_resample_matches_windowed_sinc_sum() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(2000)
    got = resample(torch.from_numpy(x.astype(np.float32))[None], 44100, 16000)[0].numpy()
    assert len(got) == math.ceil(2000 * 16000 / 44100)
    # Output j sits at input time j * 44100/16000; sum over taps within 6 zero crossings of the cutoff.
    cutoff = 16000 * 0.99 / 44100
    for j in (100, 333, 600):
        t0 = j * 44100 / 16000
        n = np.arange(len(x))
        u = (n - t0) * cutoff
        inside = np.abs(u) <= 6
        window = np.cos(np.pi * u[inside] / 12) ** 2
        expected = np.sum(x[inside] * cutoff * np.sinc(u[inside]) * window)
        assert abs(got[j] - expected) < 1e-4


def test_audio_shape_and_stereo_uses_first_channel() -> None:
    stereo = media.wav(seconds=3, channels=2)
    out = preprocess_audio(stereo, "s.wav", 60)
    assert out.shape == (3, 1, 128, 204)
    import soundfile

    samples, _ = soundfile.read(io.BytesIO(stereo), dtype="float32", always_2d=True)
    wave = torch.from_numpy(samples.T.copy())
    first = clip_to_melspec(wave[:, :32000], "s.wav")
    assert torch.allclose(out[0], first)


@pytest.mark.parametrize(("fmt", "rate"), [("m4a", 16000), ("adts", 16000), ("webm", 48000)])
def test_sound_in_containers_is_the_sound(fmt: str, rate: int) -> None:
    """A phone's .m4a, raw AAC, a browser's WebM/Opus: decoded to the tone that was encoded (its pitch and level),
    and the model's input is the one the same tone as WAV gives."""
    wave = media.tone(seconds=4.0, rate=rate, hz=880.0, amplitude=0.5)
    data = media.encoded_audio(wave, rate, fmt)
    assert sniff(data) == ("audio" if fmt == "adts" else "video")
    if fmt != "adts":
        assert container_modality(data, f"t.{fmt}") == "audio"
    decoded, got_rate = decode_audio(data, f"t.{fmt}", 60)
    assert got_rate == rate and decoded.shape[0] == 1
    assert abs(decoded.shape[1] / rate - 4.0) < 0.1
    middle = decoded[0, rate: 3 * rate].numpy()
    peak = np.fft.rfftfreq(len(middle), 1 / rate)[np.argmax(np.abs(np.fft.rfft(middle)))]
    assert abs(peak - 880.0) < 2.0
    assert abs(float(np.sqrt(np.mean(middle ** 2))) - 0.5 / math.sqrt(2)) < 0.03
    import soundfile

    def as_wav(sound: np.ndarray) -> torch.Tensor:
        buf = io.BytesIO()
        soundfile.write(buf, sound, rate, format="WAV")
        return preprocess_audio(buf.getvalue(), "t.wav", 60)

    def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    ours = preprocess_audio(data, f"t.{fmt}", 60)
    # The same tone as WAV: 0.975-0.992 measured (codec loss, AAC's priming delay); another pitch: 0.47-0.49.
    assert similarity(ours, as_wav(wave)) > 0.95
    assert similarity(ours, as_wav(media.tone(seconds=4.0, rate=rate, hz=1320.0))) < 0.7


def test_a_container_says_what_it_holds_and_its_sound_is_bounded() -> None:
    assert container_modality(media.mp4(frames=2), "v.mp4") == "video"
    long_sound = media.encoded_audio(media.tone(seconds=5.0), 16000, "m4a")
    with pytest.raises(PayloadTooLargeError, match="long.m4a"):
        decode_audio(long_sound, "long.m4a", 2)
    with pytest.raises(MediaError, match="cut.m4a"):
        decode_audio(long_sound[:40], "cut.m4a", 60)


def test_video_frames_clips_and_crops() -> None:
    data = media.mp4(frames=40, fps=8, width=96, height=64)  # 5 s; frame i has grey level 5i
    out = preprocess_video(data, "v.mp4", 60, 10**8)
    assert out.shape == (15, 3, 2, 224, 224)
    # Clip windows over 5 s: starts 0, .75, 1.5, 2.25, 3 -> first/last frame indices of each 2 s window.
    expected = [(0, 15), (6, 21), (12, 27), (18, 33), (24, 39)]
    grey = out[::3, 0, :, 112, 112] * STD[0] + MEAN[0]  # one crop per clip, channel 0, centre pixel
    for (first, last), got in zip(expected, grey):
        assert abs(float(got[0]) * 255 - 5 * first) < 4 and abs(float(got[1]) * 255 - 5 * last) < 4


def test_sniff_by_content() -> None:
    assert sniff(media.png()) == "image" and sniff(media.jpeg()) == "image"
    assert sniff(media.wav()) == "audio" and sniff(media.wav(fmt="FLAC")) == "audio"
    assert sniff(media.mp4(frames=2)) == "video"
    assert sniff(b"hello world, not media") is None


def test_bad_media_errors_name_the_file() -> None:
    with pytest.raises(MediaError, match="cat.png"):
        preprocess_image(media.png()[:200], "cat.png", 10**8)
    with pytest.raises(MediaError, match="a.wav"):
        preprocess_audio(media.wav()[:30], "a.wav", 60)
    with pytest.raises(PayloadTooLargeError, match="long.wav"):
        preprocess_audio(media.wav(seconds=5), "long.wav", 2)
    with pytest.raises(MediaError, match="v.mp4"):
        preprocess_video(media.mp4(frames=2)[:100], "v.mp4", 60, 10**8)
    with pytest.raises(PayloadTooLargeError, match="long.mp4"):
        preprocess_video(media.mp4(frames=40, fps=8), "long.mp4", 2, 10**8)
    with pytest.raises(PayloadTooLargeError, match="wide.mp4"):
        preprocess_video(media.mp4(frames=2), "wide.mp4", 60, 1000)


@pytest.mark.parametrize("data", [media.png()[:40], media.png()[:200], media.wav()[:100], media.mp4(frames=2)[:100],
                                  media.mp4(frames=2)[:2000], b"\x00garbage" * 30],
                         ids=["png-head", "png-cut", "wav-cut", "mp4-head", "mp4-cut", "garbage"])
def test_bad_media_errors_say_what_is_wrong_with_the_file_not_with_our_buffer(data: bytes) -> None:
    # PIL and libsndfile name the BytesIO they were handed ("<_io.BytesIO object at 0x7f...>"), FFmpeg an errno
    # and a file name it never had ("'<none>'"): none of that is the caller's.
    for read in (lambda: preprocess_image(data, "x.bin", 10**8), lambda: preprocess_audio(data, "x.bin", 60),
                 lambda: preprocess_video(data, "x.bin", 60, 10**8)):
        try:
            read()
        except MediaError as exc:
            assert str(exc).startswith("x.bin: ") and not any(leak in str(exc) for leak in ("0x", "Errno", "<none>"))


def test_decompression_bomb_refused_before_decoding() -> None:
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")  # ~10 kB file, 81 M pixels
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(PayloadTooLargeError, match="bomb.png: 9000x9000"):
        preprocess_image(buf.getvalue(), "bomb.png", 40_000_000)


def test_awkward_sample_rates_resample_in_bounded_memory() -> None:
    """4001 Hz would need a 16000 x 4001 filter bank on the exact path (+2.5 GB measured, 28 GB at 44,101 Hz)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for rate in (4001, 44101, 96001):
        tone = np.sin(2 * np.pi * 440 * np.arange(rate * 2) / rate).astype(np.float32)
        out = resample(torch.from_numpy(tone)[None], rate, 16000)[0].numpy()
        assert abs(len(out) - 32000) <= 1
        peak = np.argmax(np.abs(np.fft.rfft(out))) * 16000 / len(out)
        assert abs(peak - 440) < 2, (rate, peak)  # the same tone, at the new rate
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < 300 * 2**20
    wav = media.wav(seconds=2, rate=4001)
    assert preprocess_audio(wav, "odd.wav", 60).shape == (3, 1, 128, 204)


@pytest.mark.parametrize("rate", [999, 1_000_001])
def test_sample_rates_outside_the_sane_range_are_refused(rate: int) -> None:
    with pytest.raises(MediaError, match="sample rate") as caught:
        preprocess_audio(media.wav(seconds=0.5, rate=rate), "x.wav", 60)
    assert caught.value.code == "unsupported_sample_rate"


def test_a_long_large_video_keeps_only_the_frames_it_samples(tmp_path: Path) -> None:
    """10 s of 1280x720 at 30 fps in one colour (tens of kB): every frame decoded and kept would cost +0.8 GB.
    Measured in a fresh process (a peak RSS is only meaningful from a known start)."""
    import subprocess
    import sys

    data = media.mp4(frames=300, fps=30, width=1280, height=720, pattern="flat")
    assert len(data) < 200_000
    (tmp_path / "long.mp4").write_bytes(data)
    probe = (
        "import resource, sys, time\n"
        "from services.encoder.preprocess.video import preprocess_video\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "preprocess_video(open(sys.argv[2], 'rb').read(), 'warm.mp4', 60, 10**7)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "started = time.monotonic()\n"
        "out = preprocess_video(data, 'long.mp4', 60, 10**7)\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(tuple(out.shape), round(time.monotonic() - started, 2), grown // 1024)\n")
    (tmp_path / "small.mp4").write_bytes(media.mp4(frames=8, fps=8, width=96, height=64))
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "long.mp4"), str(tmp_path / "small.mp4")],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2], check=True)
    shape, seconds, grown_mib = result.stdout.strip().rsplit(" ", 2)[0], *result.stdout.split()[-2:]
    print(f"10 s 720p video: {seconds} s, peak RSS +{grown_mib} MiB")
    assert shape == "(15, 3, 2, 224, 224)"
    assert int(grown_mib) < 400  # 10 kept frames of 2.7 MB and the clips built from them


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_photo_is_seen_the_way_its_orientation_tag_shows_it(fmt: str) -> None:
    """A phone stores a portrait photo on its side with EXIF Orientation 6 ("turn 90 degrees clockwise to
    view"): the model gets the picture as a viewer shows it."""
    rng = np.random.default_rng(3)
    upright = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)  # taller than wide, no symmetry

    def stored(pixels: np.ndarray, orientation: int | None) -> bytes:
        image, out = Image.fromarray(pixels), io.BytesIO()
        exif = Image.Exif()
        if orientation is not None:
            exif[0x0112] = orientation
        image.save(out, fmt, exif=exif, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
        return out.getvalue()

    sideways = np.rot90(upright, k=1).copy()  # what the sensor wrote: the picture turned counter-clockwise
    seen = preprocess_image(stored(sideways, 6), "photo", 10**7)
    expected = preprocess_image(stored(upright, None), "upright", 10**7)
    tolerance = 1e-6 if fmt == "PNG" else 0.2  # JPEG's blocks fall differently on the turned picture
    assert (seen - expected).abs().mean() < tolerance
    assert (preprocess_image(stored(sideways, None), "raw", 10**7) - expected).abs().mean() > 0.5


def test_a_16_bit_greyscale_picture_keeps_its_greys() -> None:
    """Pillow opens a 16-bit greyscale PNG as "I;16", whose RGB conversion clips every value above 255: a ramp
    from black to white came out white. It is seen as the 8-bit picture of the same greys."""
    ramp = np.linspace(0, 65535, 256 * 256).reshape(256, 256).astype(np.uint16)
    deep, shallow = io.BytesIO(), io.BytesIO()
    Image.fromarray(ramp).save(deep, "PNG")
    Image.fromarray(np.round(ramp / 257).astype(np.uint8)).save(shallow, "PNG")
    assert Image.open(io.BytesIO(deep.getvalue())).mode.startswith("I")
    seen = preprocess_image(deep.getvalue(), "deep", 10**7)
    assert (seen - preprocess_image(shallow.getvalue(), "shallow", 10**7)).abs().max() < 1e-6


def test_a_phone_clip_is_seen_the_way_a_player_shows_it() -> None:
    """A portrait clip from a phone: landscape frames and a display matrix turning them a quarter clockwise. The
    model gets the turned frames (on their side, a shape moving up would read as moving left)."""
    frames = np.zeros((24, 48, 80, 3), np.uint8)
    frames[:, :, :40, 0] = 255  # left half red, right half blue: no turn leaves it as it was
    frames[:, :, 40:, 2] = 255
    upright = np.ascontiguousarray(np.rot90(frames, k=-1, axes=(1, 2)))  # what a player shows
    seen = preprocess_video(media.shown_turned_clockwise(media.mp4_of(frames)), "portrait", 30.0, 10**7)
    expected = preprocess_video(media.mp4_of(upright), "upright", 30.0, 10**7)
    raw = preprocess_video(media.mp4_of(frames), "raw", 30.0, 10**7)
    assert (seen - expected).abs().mean() < 0.05
    assert (raw - expected).abs().mean() > 0.5


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_a_heic_or_avif_photo_is_a_picture(fmt: str) -> None:
    """HEIC (a phone's photos) and AVIF are ISO-BMFF files like an MP4: they are pictures, read as one (they were
    taken for containers, and FFmpeg made a one-frame clip of them, of an iPhone photo's first tile only)."""
    data = media.still(fmt)
    assert data[4:8] == b"ftyp" and sniff(data) == "image" and not is_container(data)
    assert sniff(media.mp4(frames=2)) == "video" and is_container(media.mp4(frames=2))
    seen = preprocess_image(data, f"photo.{fmt.lower()}", 10**7)
    assert (seen - preprocess_image(media.still("PNG"), "photo.png", 10**7)).abs().mean() < 0.05


def test_a_jpeg_past_the_pixel_bound_is_read_at_a_smaller_scale() -> None:
    """A photo past the bound on pixels (a 50 MP phone's) is read at a JPEG's cheap 1/8 scale, not refused; a
    PNG that large is still refused before any decoding."""
    big = np.asarray(Image.fromarray(media.smooth(320, 240)).resize((3200, 2400)))
    out = io.BytesIO()
    Image.fromarray(big).save(out, "JPEG", quality=95)
    seen = preprocess_image(out.getvalue(), "photo.jpg", 1_000_000)
    assert (seen - preprocess_image(out.getvalue(), "photo.jpg", 10**8)).abs().mean() < 0.05  # full decode
    with pytest.raises(PayloadTooLargeError, match="photo.png: 3200x2400"):
        preprocess_image(media.still("PNG", big), "photo.png", 1_000_000)


def _encoded(image: Image.Image) -> bytes:
    out = io.BytesIO()
    extra = {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
    image.save(out, "PNG", **extra)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["RGBA", "LA", "palette", "colour key"])
def test_transparent_parts_of_a_picture_are_white(kind: str) -> None:
    """A shape on a transparent background is seen as a viewer shows it, on white: the colour stored under
    transparent pixels (black here, or whatever paint was left there) is not part of the picture."""
    shape = np.zeros((64, 64), bool)
    shape[16:48, 16:48] = True
    ink = (200, 30, 30) if kind != "LA" else (60, 60, 60)
    shown = np.full((64, 64, 3), 255, np.uint8)
    shown[shape] = ink
    if kind == "RGBA":
        pixels = np.zeros((64, 64, 4), np.uint8)
        pixels[shape] = (*ink, 255)
        pixels[~shape] = (0, 255, 0, 0)  # left-over green paint under full transparency
        stored = Image.fromarray(pixels, "RGBA")
    elif kind == "LA":
        pixels = np.zeros((64, 64, 2), np.uint8)
        pixels[shape] = (60, 255)
        stored = Image.fromarray(pixels, "LA")
    elif kind == "palette":  # a GIF-style palette whose entry 0 is transparent
        stored = Image.fromarray(shape.astype(np.uint8), "L").convert("P")
        stored.putpalette([0, 0, 0, *ink] + [0] * 762)
        stored.info["transparency"] = 0
    else:  # an RGB PNG with a tRNS colour: black means transparent
        pixels = np.zeros((64, 64, 3), np.uint8)
        pixels[shape] = ink
        stored = Image.fromarray(pixels, "RGB")
        stored.info["transparency"] = (0, 0, 0)
    data = _encoded(stored)
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode in ("RGBA", "LA", "P", "RGB") and (reopened.mode != "RGB" or "transparency" in reopened.info)
    expected = preprocess_image(_encoded(Image.fromarray(shown, "RGB")), "shown.png", 10**7)
    assert (preprocess_image(data, f"{kind}.png", 10**7) - expected).abs().max() < 1e-5
    # What a plain RGB conversion gives differs, so the test tells the two apart.
    assert np.abs(np.asarray(reopened.convert("RGB"), np.int16) - shown).max() > 100


def _tagged(pixels: np.ndarray, fmt: str, profile: bytes | None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, fmt, **({"icc_profile": profile} if profile else {}),
                                        **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_picture_is_seen_in_the_colours_its_profile_gives(fmt: str) -> None:
    """Stored values mean what the picture's ICC profile says (a phone's Display P3, a camera's Adobe RGB). Here a
    profile whose stored red is sRGB's blue: the model sees a blue square, as a colour-managed viewer shows it."""
    c = media.SRGB_COLORANTS
    swapped = media.icc_profile({"r": c["b"], "g": c["g"], "b": c["r"]}, name="swapped")
    stored = np.zeros((64, 64, 3), np.uint8)
    stored[..., 0] = 255
    shown = np.zeros((64, 64, 3), np.uint8)
    shown[..., 2] = 255
    seen = preprocess_image(_tagged(stored, fmt, swapped), f"swapped.{fmt}", 10**7)
    expected = preprocess_image(_tagged(shown, fmt, None), f"shown.{fmt}", 10**7)
    assert (seen - expected).abs().max() < 0.05
    assert (preprocess_image(_tagged(stored, fmt, None), "untagged", 10**7) - expected).abs().max() > 1


def test_srgb_and_unreadable_profiles_leave_the_pixels_as_stored() -> None:
    pixels = np.asarray(Image.open(io.BytesIO(media.png(96, 80)))).copy()
    plain = preprocess_image(_tagged(pixels, "PNG", None), "plain", 10**7)
    srgb = media.icc_profile(media.SRGB_COLORANTS, name="sRGB IEC61966-2.1")
    assert torch.equal(preprocess_image(_tagged(pixels, "PNG", srgb), "srgb", 10**7), plain)
    assert torch.equal(preprocess_image(_tagged(pixels, "PNG", b"not a profile" * 20), "broken", 10**7), plain)


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_transparent_parts_of_an_animation_are_white(fmt: str) -> None:
    """An animated GIF or PNG of a square moving over a transparent background is seen as on a page: on white, as
    its frames are when they are stored opaque on white."""
    n, ink = 16, (200, 30, 30)
    shown = np.full((n, 64, 64, 3), 255, np.uint8)
    for i in range(n):
        shown[i, 24:40, 2 * i:2 * i + 16] = ink
    if fmt == "PNG":
        rgba = np.zeros((n, 64, 64, 4), np.uint8)
        rgba[..., :3] = (0, 0, 0)
        rgba[(shown != 255).any(-1)] = (*ink, 255)
        frames = [Image.fromarray(f, "RGBA") for f in rgba]
        extra: dict[str, object] = {}
    else:  # palette entry 0 transparent, entry 1 the ink
        frames = []
        for f in shown:
            p = Image.fromarray((f != 255).any(-1).astype(np.uint8), "L").convert("P")
            p.putpalette([0, 0, 0, *ink] + [0] * 762)
            frames.append(p)
        extra = {"transparency": 0, "disposal": 2}
    out = io.BytesIO()
    frames[0].save(out, fmt, save_all=True, append_images=frames[1:], duration=125, loop=0, **extra)
    seen = preprocess_video(out.getvalue(), f"moving.{fmt}", 60, 10**7)
    expected = preprocess_video(media.animation(fmt, shown), f"shown.{fmt}", 60, 10**7)
    assert (seen - expected).abs().max() < 0.05
