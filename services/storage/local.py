"""``ArtifactStore`` on a local folder (embedded mode): one file per object plus a JSON sidecar."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from services.contracts.errors import ServiceUnavailableError
from services.contracts.storage import (
    ArtifactMeta,
    ArtifactNotFoundError,
    ArtifactStore,
    check_key,
    check_metadata,
)


class LocalArtifactStore(ArtifactStore):
    def __init__(self, root: Path, max_object_bytes: int) -> None:
        super().__init__(max_object_bytes)
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        # check_key admits only [a-z0-9-]/digits/hex names, so the join cannot leave root.
        return self.root / check_key(key)

    @staticmethod
    def _meta_path(path: Path) -> Path:
        return path.with_name(path.name + ".meta.json")

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put(self, key: str, data: bytes, mime: str, *, metadata: dict[str, str] | None = None) -> ArtifactMeta:
        path = self._path(key)
        self._check_size(len(data))
        meta = ArtifactMeta(key=key, mime=mime, size=len(data), created_at=datetime.now(timezone.utc),
                            metadata=check_metadata(metadata))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Sidecar first, data last: an object is visible only once both are complete.
        self._write_atomic(self._meta_path(path), meta.model_dump_json().encode())
        self._write_atomic(path, data)
        return meta

    def head(self, key: str) -> ArtifactMeta:
        path = self._path(key)
        if not path.is_file():
            raise ArtifactNotFoundError(key)
        try:
            return ArtifactMeta.model_validate(json.loads(self._meta_path(path).read_text()))
        except FileNotFoundError as exc:
            raise ArtifactNotFoundError(key) from exc

    def iter_bytes(self, key: str, start: int = 0, end: int | None = None,
                   chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = path.open("rb")
        except FileNotFoundError as exc:
            raise ArtifactNotFoundError(key) from exc
        return self._chunks(handle, start, end, chunk_size)

    @staticmethod
    def _chunks(handle, start: int, end: int | None, chunk_size: int) -> Iterator[bytes]:  # type: ignore[no-untyped-def]
        with handle:
            handle.seek(start)
            remaining = None if end is None else max(0, end - start)
            while remaining is None or remaining > 0:
                chunk = handle.read(chunk_size if remaining is None else min(chunk_size, remaining))
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        self._meta_path(path).unlink(missing_ok=True)

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        check_key(key)
        return None

    def sweep(self, kind: str, before: datetime) -> int:
        folder = self.root / kind
        cutoff, removed = before.timestamp(), 0
        if not folder.is_dir():
            return 0
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.endswith(".meta.json") and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                self._meta_path(path).unlink(missing_ok=True)
                removed += 1
        for day in sorted(folder.rglob("*"), reverse=True):  # empty date folders go too
            if day.is_dir() and not any(day.iterdir()):
                day.rmdir()
        return removed

    def check_health(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise ServiceUnavailableError(f"artifact folder {self.root} is not writable", code="storage_unavailable")
