"""Image: RGB, resize the short side to 224 (bicubic), centre-crop 224, CLIP mean/std -> (3, 224, 224)."""

from __future__ import annotations

import functools
import io
import logging
import warnings

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

from services.contracts.errors import PayloadTooLargeError
from services.encoder.media import is_heif
from services.encoder.preprocess import MediaError, reason

log = logging.getLogger(__name__)

SIZE = 224
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    # The long side is truncated, not rounded, as torchvision's Resize(int) computes it.
    w, h = image.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return image.resize(new, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) with CLIP's mean and std."""
    x = rgb.astype(np.float32) / 255.0
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


@functools.cache
def _heif_opener() -> None:
    """Pillow reads AVIF itself; HEIC (a phone's photos) through pillow-heif's plugin, registered on first use."""
    from pillow_heif import register_heif_opener

    register_heif_opener()


def animated(data: bytes) -> bool:
    """Whether ``data`` is an animated GIF or PNG (APNG): a clip, which the video branch reads (FFmpeg decodes
    both), not a picture of its first frame. Read from the headers, no frame decoded. (An animated WebP stays a
    picture: FFmpeg cannot decode one.)"""
    if not data.startswith((b"GIF87a", b"GIF89a", b"\x89PNG\r\n\x1a\n")):
        return False
    try:
        return bool(getattr(Image.open(io.BytesIO(data)), "is_animated", False))
    except Exception:  # not readable: the picture's own path says what is wrong with it
        return False


def open_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    if is_heif(data):
        _heif_opener()
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises many types for bad files
        raise MediaError(f"{name}: not a readable image ({reason(exc)})", code="invalid_image",
                         param=name) from exc
    w, h = image.size
    if w * h > max_pixels and image.format == "JPEG":
        # A JPEG decodes at 1/2, 1/4 or 1/8 of its size for a fraction of the work: a 50 MP photo is read at the
        # scale that still leaves the model's 224 pixels, not refused. (Below the bound, the full decode keeps
        # the reference preprocessing exactly.)
        image.draft("RGB", (SIZE, SIZE))
        w, h = image.size
    # Checked on the header, before any pixel is decoded: a 100 kB PNG can claim 50k x 50k pixels.
    if w * h > max_pixels:
        raise PayloadTooLargeError(f"{name}: {w}x{h} pixels exceeds the limit of {max_pixels}",
                                   code="image_too_large", param=name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except Exception as exc:
        raise MediaError(f"{name}: corrupt or truncated image ({reason(exc)})", code="invalid_image",
                         param=name) from exc
    # A phone's photo is stored as the sensor saw it, with an EXIF tag saying how to turn it: the model sees it the
    # way the user does (a viewer applies the tag), not on its side.
    image = ImageOps.exif_transpose(image)
    profile = image.info.get("icc_profile")
    if image.mode == "CMYK" and profile:  # print files: only their profile says which RGB their inks make
        cmyk = _transform(profile, "CMYK")
        image = image if cmyk is None else ImageCms.applyTransform(image, cmyk)
        profile = None
    if image.mode.startswith("I"):  # 16-bit greyscale (PNG): Pillow's RGB conversion clips it, nearly all white
        grey = np.asarray(image, dtype=np.float64) / 257.0  # 0..65535 onto 0..255
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), "L")
    rgb = on_white(image)
    if profile:  # applied by in_srgb once the picture is down to the model's size (a 12 MP photo took 0.3 s)
        rgb.info["icc_profile"] = profile
    return rgb


@functools.lru_cache(maxsize=8)
def _transform(profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """From the picture's colour profile to sRGB, which the model's pictures were in; None for an sRGB profile
    (nothing to do) and for one that cannot be read or does not fit the pixels (a viewer shows those as stored)."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if "srgb" in ImageCms.getProfileDescription(source).lower().replace(" ", ""):
            return None
        return ImageCms.buildTransform(source, _srgb(), mode, "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        log.debug("colour profile ignored: %s", exc)
        return None


@functools.cache
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def in_srgb(image: Image.Image) -> Image.Image:
    """An RGB picture's colours in sRGB, by the profile it carries: a phone's photo in Display P3 or a camera's in
    Adobe RGB, read as if it were sRGB, has duller or shifted colours."""
    profile = image.info.get("icc_profile")
    transform = _transform(profile, "RGB") if profile else None
    return image if transform is None else ImageCms.applyTransform(image, transform)


def on_white(image: Image.Image) -> Image.Image:
    """RGB as a viewer shows the picture: what is transparent (an alpha channel, or a palette's or a colour's
    transparency) lies on white. A plain RGB conversion keeps the colour stored under transparent pixels, usually
    black, sometimes left-over paint: a logo on a transparent background became a logo on black."""
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def preprocess_image(data: bytes, name: str, max_pixels: int) -> torch.Tensor:
    image = in_srgb(center_crop(resize_short_side(open_image(data, name, max_pixels), SIZE), SIZE))
    return torch.from_numpy(normalize(np.asarray(image)))
