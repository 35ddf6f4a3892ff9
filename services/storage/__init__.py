"""``ArtifactStore`` implementations: a local folder (embedded mode) and S3-compatible object storage."""

from __future__ import annotations

from services.contracts.settings import Settings
from services.contracts.storage import ArtifactStore


def build_artifact_store(settings: Settings) -> ArtifactStore:
    if settings.storage.backend == "s3":
        from services.storage.s3 import S3ArtifactStore

        return S3ArtifactStore.from_settings(settings.storage)
    from services.storage.local import LocalArtifactStore

    return LocalArtifactStore(settings.artifacts_dir, settings.storage.max_object_bytes)
