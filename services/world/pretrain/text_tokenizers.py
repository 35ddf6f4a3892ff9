"""Tokenizers of the decoders' text encoders with merges for the world's words.

The real CLIP and CLAP tokenizers were trained on their corpora, so common words are one token each; these are
their byte-level BPE formats with merges that make each world word one token, so a small text encoder reads
words rather than spelling them out.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.bundle.tiny.text_tokenizers import _byte_unicode
from services.world.attributes import CLASSES

WORLD_WORDS = sorted({w for values in CLASSES.values() for w in values} | {"a", "moving", "tone"})


def _chain(symbols: list[str]) -> list[tuple[str, str]]:
    """The merges that fuse ``symbols`` left to right into one token."""
    merges, current = [], symbols[0]
    for symbol in symbols[1:]:
        merges.append((current, symbol))
        current += symbol
    return merges


def _write(out_dir: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[tuple[str, str]] = set()
    lines = ["#version: 0.2"]
    for a, b in merges:
        if (a, b) in seen:
            continue
        seen.add((a, b))
        lines.append(f"{a} {b}")
        vocab.setdefault(a + b, len(vocab))
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("\n".join(lines) + "\n")
    return vocab_path, merges_path


def write_world_clip_tokenizer_files(out_dir: Path) -> tuple[Path, Path]:
    """CLIP's format: bytes, bytes + ``</w>``, then merges; start/end tokens last as in CLIP."""
    chars = _byte_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": 256 + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in WORLD_WORDS:
        if len(word) > 1:
            merges += _chain(list(word[:-1]) + [word[-1] + "</w>"])
    vocab_path, merges_path = _write(out_dir, vocab, merges)
    vocab = json.loads(vocab_path.read_text())
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    return vocab_path, merges_path


def write_world_roberta_tokenizer_files(out_dir: Path) -> tuple[Path, Path]:
    """Roberta's (GPT-2) format: words after a space carry the byte-level space marker."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in _byte_unicode():
        vocab[c] = len(vocab)
    vocab["<mask>"] = len(vocab)
    space = _byte_unicode()[ord(" ")]
    merges: list[tuple[str, str]] = []
    for word in WORLD_WORDS:
        if len(word) > 1:
            merges += _chain(list(word))
        merges.append((space, word))  # after the word's own merges, which apply first
    return _write(out_dir, vocab, merges)
