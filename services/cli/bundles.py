"""Which bundle a command serves: the one configured, by default the committed world bundle, ``tiny`` for the
random tiny bundle (built on first use). No torch unless the tiny bundle has to be built: the serving commands
resolve it before they start anything, so that a wrong path fails at once."""

from __future__ import annotations

import logging
from pathlib import Path

from services.bundle.loader import Bundle, load_bundle
from services.contracts.settings import Settings

log = logging.getLogger(__name__)
# The trained world bundle committed with the repository (see `make world-bundle`).
WORLD_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "nextgpt-world"
TINY = Path("tiny")


def resolve_bundle(settings: Settings) -> Bundle:
    """The configured bundle; by default the committed world bundle; ``tiny`` for the random tiny bundle in the
    cache folder (built on first use, and the fallback where the world bundle is not there)."""
    if settings.bundle is not None and settings.bundle != TINY:
        return load_bundle(settings.bundle)
    if settings.bundle is None and (WORLD_BUNDLE / "bundle.json").is_file():
        return load_bundle(WORLD_BUNDLE)
    target = settings.tiny_bundle_dir
    if not (target / "bundle.json").is_file():
        _build_tiny_once(target)
    return load_bundle(target)


def _build_tiny_once(target: Path) -> None:
    """Build the tiny bundle on first use, once, even when several services start at the same moment on one
    cache: an exclusive lock on a file beside it; whoever gets it second finds the bundle there and waits no more."""
    import fcntl

    from services.bundle.tiny.build import build_tiny_bundle

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (target / "bundle.json").is_file():
                log.info("building the tiny bundle into %s (first use)", target)
                build_tiny_bundle(target, seed=0, force=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
