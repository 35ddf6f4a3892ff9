"""A broken bundle is refused with an error that names the file and what is wrong."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from services.bundle.loader import load_bundle
from services.contracts.errors import BundleError


@pytest.fixture()
def copy(tiny_bundle_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, dest)
    return dest


def _edit(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = root / "bundle.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _error(root: Path) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(root)
    return info.value.message


def test_valid_bundle_loads(copy: Path) -> None:
    assert load_bundle(copy).manifest.name == "nextgpt-tiny"


def test_missing_directory(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nope")
    (tmp_path / "bundle.safetensors").write_bytes(b"")  # a file where the folder was meant: not "does not exist"
    assert "is a file, not a bundle's folder" in _error(tmp_path / "bundle.safetensors")


def test_missing_manifest(copy: Path) -> None:
    (copy / "bundle.json").unlink()
    assert f"{copy / 'bundle.json'}: manifest not found" in _error(copy)


def test_manifest_not_json(copy: Path) -> None:
    (copy / "bundle.json").write_text("{not json")
    assert "bundle.json: not valid JSON" in _error(copy)


def test_unknown_key_is_refused(copy: Path) -> None:
    _edit(copy, lambda d: d["llm"].__setitem__("hiden_size", 5))
    message = _error(copy)
    assert "bundle.json" in message and "llm.hiden_size" in message


def test_unsupported_schema_version(copy: Path) -> None:
    _edit(copy, lambda d: d.__setitem__("schema_version", 2))
    assert "schema_version 2 is not supported" in _error(copy)


def test_signal_token_not_in_tokenizer(copy: Path) -> None:
    _edit(copy, lambda d: d["outputs"]["image"]["signal"]["tokens"].__setitem__(0, "[PIC0]"))
    message = _error(copy)
    assert "llm/tokenizer.json" in message and "'[PIC0]' is not in the tokenizer" in message


def test_signal_token_with_wrong_id(copy: Path) -> None:
    _edit(copy, lambda d: d["outputs"]["audio"]["signal"]["token_ids"].__setitem__(0, 3))
    assert "'[AUD0]' has id" in _error(copy)


def test_missing_weight_file(copy: Path) -> None:
    (copy / "projectors" / "video.safetensors").unlink()
    assert f"{copy / 'projectors' / 'video.safetensors'}: file not found" in _error(copy)


def test_projector_of_the_wrong_shape(copy: Path) -> None:
    path = copy / "projectors" / "image.safetensors"
    path.unlink()
    save_file({"fc.weight": torch.zeros(64, 99)}, str(path))
    message = _error(copy)
    assert str(path) in message and "'fc.weight' has shape [64, 99], expected [64, 128]" in message


def test_decoder_width_must_match_projector(copy: Path) -> None:
    _edit(copy, lambda d: d["outputs"]["image"]["decoder"].__setitem__("source", "decoders/video"))
    message = _error(copy)
    assert "decoders/video/model_index.json: pipeline 'TextToVideoSDPipeline'" in message
    assert "cross_attention_dim is 48, projector out_dim is 32" in message


def test_paths_cannot_leave_the_bundle(copy: Path) -> None:
    _edit(copy, lambda d: d["encoder"].__setitem__("weights", "../../etc/passwd"))
    assert "leaves the bundle" in _error(copy)


def test_every_problem_is_reported_at_once(copy: Path) -> None:
    (copy / "projectors" / "video.safetensors").unlink()
    (copy / "encoder" / "input_projection.safetensors").unlink()
    message = _error(copy)
    assert "video.safetensors" in message and "input_projection.safetensors" in message


def test_corrupt_safetensors(copy: Path) -> None:
    path = copy / "projectors" / "audio.safetensors"
    path.unlink()
    path.write_bytes(b"\x05")
    assert f"{path}: too short" in _error(copy)
