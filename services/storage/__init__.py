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


def build_retention(settings: Settings, store: ArtifactStore):  # noqa: ANN201 - imported lazily below
    from services.storage.retention import Retention, RetentionPolicy

    st = settings.storage
    return Retention(store, RetentionPolicy(st.conditioning_retention_s, st.artifact_retention_s), st.sweep_every_s)
