"""Bounds on what one encode request may cost; every one of them is a 4xx when crossed, never a crash."""

from __future__ import annotations

from pydantic import BaseModel, Field


class EncoderLimits(BaseModel):
    max_files: int = Field(default=8, ge=1, description="Media items per request")
    max_file_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="Decompression-bomb guard")
    max_audio_seconds: float = Field(default=600.0, gt=0)
    max_video_seconds: float = Field(default=600.0, gt=0)
    max_video_pixels: int = Field(default=4096 * 2160, ge=1, description="Per frame")
