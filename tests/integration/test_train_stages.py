"""`nextgpt train` stages on the tiny bundle and a small world: a few steps each. The loss falls, nothing frozen
changes, and each output bundle loads and serves (the last one with its new LoRA adapter)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.bundle.loader import load_bundle
from services.contracts.llm import GenerateParams, SignalEvent, Turn
from services.llm.hf_backend import HFBackend
from services.training.runner import StageRun, train_stage
from services.world.dataset import write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(out, seed=0, counts={"image": 48, "video": 48, "audio": 24}, progress=False)
    return out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _frozen_files(bundle: Path) -> dict[str, str]:
    """Files no stage may touch: ImageBind and every decoder file."""
    files = [bundle / "encoder" / "imagebind.safetensors", *sorted((bundle / "decoders").rglob("*.safetensors"))]
    return {str(p.relative_to(bundle)): _digest(p) for p in files}


def _losses(work: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (work / "loss.jsonl").read_text().splitlines()]


def _train(stage: str, bundle: Path, world: Path, tmp: Path, steps: int) -> tuple[Path, dict[str, object]]:
    out = tmp / stage
    report = train_stage(StageRun(stage=stage, bundle=bundle, data=world, out=out, work=tmp / f"{stage}.work",
                                  steps=steps, progress=False, pool_size=256))
    return out, report


def _falls(losses: list[float]) -> bool:
    """The loss log has a row every 10 steps: the last is below the first."""
    return len(losses) >= 3 and losses[-1] < losses[0]


def test_three_stages_train_only_their_parts_and_serve(tiny_bundle_dir: Path, world: Path, tmp_path: Path) -> None:
    frozen = _frozen_files(tiny_bundle_dir)
    base_llm = load_file(str(tiny_bundle_dir / "llm" / "model.safetensors"))

    s1, report1 = _train("align-encoder", tiny_bundle_dir, world, tmp_path, 30)
    assert _falls(_losses(tmp_path / "align-encoder.work"))
    assert report1["trainable"] == 1024 * 128 + 128  # the input projection alone
    assert _frozen_files(s1) == frozen
    assert _digest(s1 / "llm" / "model.safetensors") == _digest(tiny_bundle_dir / "llm" / "model.safetensors")
    for name in ("image", "video", "audio"):
        assert _digest(s1 / "projectors" / f"{name}.safetensors") == \
            _digest(tiny_bundle_dir / "projectors" / f"{name}.safetensors")
    assert _digest(s1 / "encoder" / "input_projection.safetensors") != \
        _digest(tiny_bundle_dir / "encoder" / "input_projection.safetensors")

    s2, _ = _train("align-decoder", s1, world, tmp_path, 30)
    assert _falls(_losses(tmp_path / "align-decoder.work"))
    assert _frozen_files(s2) == frozen
    manifest = load_bundle(s2).manifest
    signal_ids = sorted(i for spec in manifest.outputs.values() for i in spec.signal.token_ids)
    trained = load_file(str(s2 / "llm" / "model.safetensors"))
    for key, before in base_llm.items():
        after = trained[key]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            others = torch.ones(before.shape[0], dtype=torch.bool)
            others[signal_ids] = False
            assert torch.equal(after[others], before[others]), f"{key}: a non-signal row changed"
            assert not torch.equal(after[signal_ids], before[signal_ids])
        else:
            assert torch.equal(after, before), f"{key} changed in decoder alignment"
    rows = load_file(str(s2 / "projectors" / "image.signal_embeddings.safetensors"))["signal_input_embeddings"]
    assert torch.equal(rows, trained["model.embed_tokens.weight"][manifest.outputs["image"].signal.token_ids])

    s3, report3 = _train("instruct", s2, world, tmp_path, 30)
    assert _falls(_losses(tmp_path / "instruct.work"))
    assert _frozen_files(s3) == frozen
    bundle = load_bundle(s3)
    assert bundle.manifest.llm.default_lora == "nextgpt"
    assert (s3 / "lora" / "nextgpt" / "adapter_config.json").is_file()
    assert report3["held_out_after"] != report3["held_out_before"]

    # The trained bundle serves: its LoRA is loaded and selected, and a signal group comes out conditioned.
    backend = HFBackend(bundle)
    events: list[object] = []
    params = GenerateParams(turns=[Turn(role="user", text="Draw a big red circle.")], max_tokens=24, seed=1,
                            require_modalities=["image"])
    backend.generate(params, None, events.append, threading.Event())
    signals = [e for e in events if isinstance(e, SignalEvent)]
    shapes = {"image": (77, 32), "video": (77, 48), "audio": (24,)}
    assert "image" in {s.modality for s in signals}
    assert all(s.conditioning.shape == shapes[s.modality] for s in signals)
