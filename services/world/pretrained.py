"""What `nextgpt world assemble` takes from a pretraining work folder, checked without importing torch: the CLI
refuses a folder that lacks them in a second, not after the model libraries have loaded (11 s on 2 cores)."""

from __future__ import annotations

from pathlib import Path

DECODER_PARTS = ("image", "video", "audio")


def check_pretrained(work: Path) -> None:
    needed = [work / "imagebind" / "imagebind.safetensors", work / "language" / "exported",
              *(work / part / "exported" for part in DECODER_PARTS)]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(f"pretrain these parts first (`nextgpt world pretrain`), missing: {missing}")
