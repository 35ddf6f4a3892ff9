"""The decoder boundary: a job names its conditioning by object-store key (never a tensor) and its options;
workers report progress, completion and failure as events and a queryable status."""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.contracts.bundle_manifest import Modality
from services.contracts.ids import is_hex_id
from services.contracts.storage import check_key

JobState = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
CONDITIONING_TENSOR = "conditioning"

ARTIFACT_FORMATS: dict[str, tuple[str, str]] = {  # modality -> (suffix, mime)
    "image": (".png", "image/png"),
    "video": (".mp4", "video/mp4"),
    "audio": (".wav", "audio/wav"),
}


def new_job_id() -> str:
    return uuid.uuid4().hex


class DecodeOptions(BaseModel):
    """Per-job overrides; None takes the bundle's default for the modality. Upper bounds keep one job finite."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(default=None, ge=1, le=200)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0)
    height: int | None = Field(default=None, ge=32, le=2048, multiple_of=8)
    width: int | None = Field(default=None, ge=32, le=2048, multiple_of=8)
    frames: int | None = Field(default=None, ge=1, le=128)
    fps: int | None = Field(default=None, ge=1, le=60)
    # AudioLDM needs 4 latent frames at least (0.04 s with its 16 kHz vocoder); below that a job would fail in the
    # decoder after the reply was written, so it is refused up front, with a margin for other vocoders.
    seconds: float | None = Field(default=None, ge=0.1, le=60.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


class DecodeJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    modality: Modality
    conditioning_key: str
    # Chosen by the dispatcher, so every delivery of this job writes the same object: never two artifacts.
    artifact_key: str
    options: DecodeOptions = Field(default_factory=DecodeOptions)
    owner: str | None = Field(default=None, max_length=128)

    @field_validator("job_id")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not is_hex_id(value):
            raise ValueError("job_id must be 32 lowercase hex characters")
        return value

    @field_validator("conditioning_key", "artifact_key")
    @classmethod
    def _key(cls, value: str) -> str:
        return check_key(value)


class ArtifactInfo(BaseModel):
    key: str
    modality: Modality
    mime: str
    bytes: int
    metadata: dict[str, str] = Field(default_factory=dict)


class JobEvent(BaseModel):
    """What a worker reports: ``progress`` (step/total), ``completed`` (artifact), ``failed`` (error), ..."""

    job_id: str
    type: Literal["queued", "started", "progress", "completed", "failed", "cancelled"]
    step: int | None = None
    total: int | None = None
    artifact: ArtifactInfo | None = None
    error: str | None = None
    owner: str | None = Field(default=None, description="On 'queued': the caller's identity (a key hash)")
    at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


class JobStatus(BaseModel):
    job_id: str
    modality: Modality | None = None
    owner: str | None = None
    state: JobState
    step: int = 0
    total: int = 0
    artifact: ArtifactInfo | None = None
    error: str | None = None
    updated_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


class DecoderQueue(ABC):
    """Where decode jobs go: a Celery queue per modality (distributed) or a local worker pool (embedded)."""

    # Whether its jobs go on when this process stops (workers of their own), so that a client can still follow them.
    outlives_process: bool = False

    @abstractmethod
    async def submit(self, job: DecodeJob) -> None:
        """Queue ``job``; its status becomes ``queued``."""

    @abstractmethod
    async def status(self, job_id: str) -> JobStatus | None:
        """The job's last known status, None for an unknown (or expired) job."""

    @abstractmethod
    async def cancel(self, job_id: str) -> None:
        """Ask for the job to stop; a queued job never starts, a running one stops at its next step."""

    @abstractmethod
    def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """Events of the job from its start, ending after a terminal event."""


def decode_pixels(modality: str, height: int | None, width: int | None, frames: int | None) -> int:
    """What bounds one decode's memory and time: height x width (x frames for video); 0 for audio."""
    if modality not in ("image", "video"):
        return 0
    return (height or 0) * (width or 0) * ((frames or 1) if modality == "video" else 1)


def describe_size(modality: str, height: int | None, width: int | None, frames: int | None) -> str:
    return f"{modality} of {height}x{width}" + (f"x{frames} frames" if modality == "video" else "")
