"""Reading and writing ``bundle.json`` with errors that name the file and the offending field."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from services.contracts.bundle_manifest import MANIFEST_FILE, BundleManifest
from services.contracts.errors import BundleError


def write_manifest(bundle_dir: Path, manifest: BundleManifest) -> Path:
    path = bundle_dir / MANIFEST_FILE
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False) + "\n")
    return path


def tag_version(bundle_dir: Path, manifest: BundleManifest, tag: str) -> None:
    """Appends ``tag`` to the bundle's version, once: a phase run again on a bundle it has already changed (a
    resumed command) adds nothing."""
    if not manifest.version.endswith(tag):
        write_manifest(bundle_dir, manifest.model_copy(update={"version": manifest.version + tag}))


def read_manifest(bundle_dir: Path) -> BundleManifest:
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        what = "is a file, not a bundle's folder" if bundle_dir.exists() else "does not exist"
        raise BundleError(f"bundle directory {bundle_dir} {what}", code="bundle_missing")
    if not path.is_file():
        raise BundleError(f"{path}: manifest not found", code="manifest_missing")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})", code="manifest_invalid") from exc
    if isinstance(raw, dict) and raw.get("schema_version") not in (None, 1):
        raise BundleError(
            f"{path}: schema_version {raw.get('schema_version')!r} is not supported (this build reads 1)",
            code="manifest_version",
        )
    try:
        return BundleManifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise BundleError(f"{path}: {problems}", code="manifest_invalid") from exc
