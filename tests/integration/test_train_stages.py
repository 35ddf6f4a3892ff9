"""`nextgpt train` stages on the tiny bundle and a small world: a few steps each. The loss falls, nothing frozen
changes, and each output bundle loads and serves (the last one with its new LoRA adapter)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file

from services.bundle.loader import load_bundle
from services.cli.compose import embedded_app
from services.clients.encoder_http import HttpEncoderClient
from services.contracts.bundle_manifest import InputProjectionSpec
from services.contracts.encoder import EncodeResult, MediaInput
from services.contracts.errors import BundleError
from services.contracts.settings import EncoderSettings, Settings
from services.encoder.app import build_encoder_app
from services.encoder.compose import build_encoder_service
from services.contracts.llm import GenerateParams, SignalEvent, Turn
from services.llm.hf_backend import HFBackend
from services.training.runner import StageRun, train_stage
from services.training.stages import LoraOptions
from services.world.dataset import write_world
from tests.support import media
from tests.support.deepspeed import DEEPSPEED_PYTHON, ZERO2, needs_deepspeed
from tests.support.embedded import engines_here
from tests.support.servers import UvicornThread, free_port, wait_until


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
                                  steps=steps, progress=False, pool_size=256, held_out=64))
    return out, report


def _tensorboard_scalars(folder: Path, tag: str) -> dict[int, float]:
    """Step -> value of one scalar, read from the TFRecord event files (length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[int, float] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            length = int.from_bytes(data[at:at + 8], "little")
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.tag == tag:
                    found[event.step] = value.simple_value
    return found


def _falls(losses: list[float]) -> bool:
    """The loss log has a row every 10 steps: the last is below the first."""
    return len(losses) >= 3 and losses[-1] < losses[0]


def test_three_stages_train_only_their_parts_and_serve(tiny_bundle_dir: Path, world: Path, tmp_path: Path) -> None:
    frozen = _frozen_files(tiny_bundle_dir)
    base_llm = load_file(str(tiny_bundle_dir / "llm" / "model.safetensors"))

    s1, report1 = _train("align-encoder", tiny_bundle_dir, world, tmp_path, 30)
    assert _falls(_losses(tmp_path / "align-encoder.work"))
    # The same losses as TensorBoard scalars, at the same steps.
    logged = {json.loads(line)["step"]: json.loads(line)["loss"]
              for line in (tmp_path / "align-encoder.work" / "loss.jsonl").read_text().splitlines()}
    scalars = _tensorboard_scalars(tmp_path / "align-encoder.work" / "tensorboard" / "align-encoder", "loss")
    assert scalars.keys() == logged.keys()
    assert all(abs(scalars[k] - logged[k]) < 1e-4 for k in logged)
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

    # Trained further from its own adapter (`--resume-lora`): the held-out losses it starts from are those s3 ended
    # with (its adapter came back, not a fresh one), and they move on. An adapter the bundle lacks, or of another
    # rank (the tiny bundle's own is r=8), is refused.
    report4 = train_stage(StageRun(stage="instruct", bundle=s3, data=world, out=tmp_path / "instruct-more",
                                   work=tmp_path / "instruct-more.work", steps=10, progress=False, pool_size=256,
                                   held_out=64, lora=LoraOptions(resume=True)))
    before, after = report4["held_out_before"], report3["held_out_after"]
    assert isinstance(before, dict) and isinstance(after, dict)
    assert before == pytest.approx(after, rel=1e-4)
    assert report4["held_out_after"] != before
    for lora, reason in ((LoraOptions(name="other", resume=True), "has no LoRA 'other' to resume"),
                         (LoraOptions(resume=True), "LoRA 'nextgpt' has r=8, not 32")):
        with pytest.raises(ValueError, match=reason):
            train_stage(StageRun(stage="instruct", bundle=s2, data=world, out=tmp_path / "refused", steps=1,
                                 work=tmp_path / "refused.work", progress=False, pool_size=8, held_out=0, lora=lora))

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


def _prompt_tokens(url: str) -> int:
    request = {"messages": [{"role": "user", "content": "what is in this picture?", "files": ["a.png"]}],
               "max_tokens": 4, "allowed_modalities": []}
    response = httpx.post(f"{url}/v1/chat", data={"request": json.dumps(request)},
                          files=[("files", ("a.png", media.png(), "image/png"))], timeout=120)
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens"])


def test_a_group_input_projection_trains_and_is_served_like_any_other(tiny_bundle_dir: Path, world: Path,
                                                                       tmp_path: Path) -> None:
    """Stage 1 with the paper's design: concept tokens over ImageBind's token-level features, 4 LLM tokens per
    item. Only the projection trains; the bundle it writes serves through the encoder service (over HTTP) and
    the gateway's prompt builder, which gives every item its 4 tokens."""
    spec = InputProjectionSpec(kind="group", width=32, groups=[8, 4], num_heads=4)
    frozen = _frozen_files(tiny_bundle_dir)
    out = tmp_path / "group"
    report = train_stage(StageRun(stage="align-encoder", bundle=tiny_bundle_dir, data=world, out=out,
                                  work=tmp_path / "group.work", steps=30, progress=False, pool_size=256, held_out=64,
                                  input_projection=spec))
    assert _falls(_losses(tmp_path / "group.work"))
    assert report["held_out_after"]["nll"] < report["held_out_before"]["nll"]  # type: ignore[index]
    assert _frozen_files(out) == frozen
    assert _digest(out / "llm" / "model.safetensors") == _digest(tiny_bundle_dir / "llm" / "model.safetensors")
    bundle = load_bundle(out)
    assert bundle.manifest.encoder.projection == spec

    registry = CollectorRegistry()
    app = build_encoder_app(lambda: build_encoder_service(bundle, EncoderSettings(max_wait_ms=5), registry),
                            registry, EncoderSettings().max_request_bytes)
    with UvicornThread(app) as server:
        wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, 60, "encoder ready")
        items = [MediaInput(name="a.png", data=media.png()), MediaInput(name="b.wav", data=media.wav()),
                 MediaInput(name="c.png", data=media.png(seed=5))]

        async def encode() -> EncodeResult:
            async with httpx.AsyncClient() as client:
                return await HttpEncoderClient(server.url, client).encode(items)

        result = asyncio.run(encode())
    assert result.embeddings.shape == (3, 4, bundle.manifest.llm.hidden_size)
    assert not np.allclose(result.embeddings[0], result.embeddings[2], atol=1e-4)  # the picture matters

    settings = engines_here(Settings(cache_dir=tmp_path / "cache"))
    with UvicornThread(embedded_app(settings, bundle)) as server:
        group_tokens = _prompt_tokens(server.url)
    with UvicornThread(embedded_app(settings, load_bundle(tiny_bundle_dir))) as server:
        linear_tokens = _prompt_tokens(server.url)
    assert group_tokens == linear_tokens + 3

    # A manifest that names the wrong design for the weights is refused with what does not fit.
    manifest = json.loads((out / "bundle.json").read_text())
    manifest["encoder"]["projection"]["kind"] = "linear"
    (out / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not part of a linear input projection"):
        load_bundle(out)


def _launch(processes: int, bundle: Path, world: Path, out: Path, *extra: str) -> None:
    """`nextgpt train instruct` under torchrun (as `accelerate launch` starts it), gloo on this CPU, from the
    DeepSpeed environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run([str(DEEPSPEED_PYTHON), "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                           f"--master_port={free_port()}", "-m", "services.cli.main", "train", "instruct",
                           "--bundle", str(bundle),
                           "--data", str(world), "--out", str(out), "--steps", "12", "--pool", "256",
                           "--held-out", "16", *extra],
                          env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@needs_deepspeed
def test_instruct_under_zero2_over_two_processes(tiny_bundle_dir: Path, world: Path, tmp_path: Path) -> None:
    """Stage 3 with DeepSpeed ZeRO-2 over two processes: shards of a batch hold different modalities (one without
    audio has no audio projector in its graph, and no l2_audio), which must neither hang nor mix gradients. The
    curve stays with one process's (per-shard means weigh items a little differently), nothing frozen changes,
    and the bundle it writes carries the adapter."""
    frozen = _frozen_files(tiny_bundle_dir)
    _launch(1, tiny_bundle_dir, world, tmp_path / "one")
    _launch(2, tiny_bundle_dir, world, tmp_path / "zero2", "--deepspeed", str(ZERO2))
    one, sharded = _losses(tmp_path / "one.work"), _losses(tmp_path / "zero2.work")
    assert len(sharded) == len(one) == 2
    assert sharded == pytest.approx(one, rel=0.01)
    assert len(list((tmp_path / "zero2.work" / "deepspeed").glob("step12/*optim_states.pt"))) == 2
    out = tmp_path / "zero2"
    assert _frozen_files(out) == frozen
    manifest = load_bundle(out).manifest
    signal_ids = [i for spec in manifest.outputs.values() for i in spec.signal.token_ids]
    before = load_file(str(tiny_bundle_dir / "llm" / "model.safetensors"))
    after = load_file(str(out / "llm" / "model.safetensors"))
    for key, weight in before.items():  # only the signal tokens' rows of the LLM learn
        keep = torch.ones(weight.shape[0], dtype=torch.bool)
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            keep[signal_ids] = False
        assert torch.equal(after[key][keep], weight[keep]), key
    assert [lora.name for lora in manifest.llm.loras] == ["nextgpt"]
    assert (out / "lora" / "nextgpt" / "adapter_model.safetensors").is_file()
