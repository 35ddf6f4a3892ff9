"""Build a bundle in a sibling temporary folder and move it into place at the end, so that a failed or
interrupted build never leaves a half-written bundle where a service would load it."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_replaceable(out: Path, *, force: bool) -> None:
    """Refuses an ``out`` that holds something unless ``force``. Commands call it before their work (a training
    run, the model libraries' import), so that a folder in the way is said at once, not after the work is done."""
    out = out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")


@contextlib.contextmanager
def staged_output(out: Path, *, force: bool) -> Iterator[Path]:
    out = out.resolve()
    check_replaceable(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
