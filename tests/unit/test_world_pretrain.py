"""The pretraining loop and parts on tiny data: a few steps each, resumable, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from services.world.pretrain.loop import CHECKPOINT, LOSS_LOG, LoopConfig, train_part

pytestmark = pytest.mark.unit


def _regression(seed: int = 0) -> tuple[nn.Module, callable]:  # type: ignore[valid-type]
    torch.manual_seed(seed)
    model = nn.Linear(4, 1)
    target = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def step_loss(generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = torch.randn(16, 4, generator=generator)
        return {"mse": ((model(x) - x @ target.T) ** 2).mean()}

    return model, step_loss


def test_loss_falls_and_is_logged(tmp_path: Path) -> None:
    model, step_loss = _regression()
    history = train_part("reg", model, step_loss, LoopConfig(steps=60, lr=0.3, warmup=5, log_every=10), tmp_path,
                         progress=False)
    assert history[-1]["mse"] < 0.1 * history[0]["mse"]
    rows = [json.loads(line) for line in (tmp_path / LOSS_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    cfg = LoopConfig(steps=12, lr=0.05, warmup=2, checkpoint_every=4, log_every=1)
    straight, loss_a = _regression()
    train_part("a", straight, loss_a, cfg, tmp_path / "a", progress=False)

    # A run killed during step 9, after the step-8 checkpoint; then started again with a fresh module.
    first, loss_b = _regression()
    calls = 0

    def dies_at_step_9(generator: torch.Generator) -> dict[str, torch.Tensor]:
        nonlocal calls
        calls += 1
        if calls == 9:
            raise KeyboardInterrupt
        return loss_b(generator)

    with pytest.raises(KeyboardInterrupt):
        train_part("b", first, dies_at_step_9, cfg, tmp_path / "b", progress=False)
    resumed, loss_c = _regression(seed=123)  # different init: everything must come from the checkpoint
    history = train_part("b", resumed, loss_c, cfg, tmp_path / "b", progress=False)
    assert [h["step"] for h in history] == [9, 10, 11, 12]
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_language_part_learns_world_text(tmp_path: Path) -> None:
    from services.world.pretrain.language import MAX_TOKENS, pretrain_language

    model, tokenizer = pretrain_language(LoopConfig(steps=25, lr=3e-3, warmup=5, log_every=5), tmp_path / "w",
                                         tmp_path / "out", batch_size=16, corpus_size=400, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "w" / LOSS_LOG).read_text().splitlines()]
    assert rows[-1]["nll"] < rows[0]["nll"] - 1.0
    assert tokenizer.convert_tokens_to_ids("###") == tokenizer.encode("###", add_special_tokens=False)[0]
    assert len(tokenizer.encode("### Human: a big red circle", add_special_tokens=False)) < MAX_TOKENS
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_fresh_motion_groups_differ_only_in_their_direction() -> None:
    from services.world.measures import measure
    from services.world.pretrain.imagebind import FRESH_CLIP_SEED, fresh_clips
    from services.world.evaluate import EVAL_SEED

    assert FRESH_CLIP_SEED not in (0, EVAL_SEED)  # neither the training split's nor an evaluation's samples
    clips, captions = fresh_clips(torch.Generator().manual_seed(5), 8, motion_groups=True)
    assert clips.shape == (8, 8, 64, 64, 3) and clips.dtype == np.uint8
    for group in (slice(0, 4), slice(4, 8)):
        read = [measure("video", c) for c in clips[group]]
        assert [r.motion for r in read] == ["left", "right", "up", "down"]
        assert len({(r.size, r.colour, r.shape) for r in read}) == 1  # the same shape, only its path differs
        assert [c.rsplit(" ", 1)[1] for c in captions[group]] == ["left", "right", "up", "down"]
        assert len({c.rsplit(" ", 2)[0] for c in captions[group]}) == 1
        # The words agree with what is drawn.
        assert all(c == f"a {r.size} {r.colour} {r.shape} moving {r.motion}" for c, r in zip(captions[group], read))
    # Another step draws other clips; plain draws are not grouped.
    again, _ = fresh_clips(torch.Generator().manual_seed(6), 8, motion_groups=True)
    assert not np.array_equal(again, clips)
    _, plain = fresh_clips(torch.Generator().manual_seed(5), 8, motion_groups=False)
    assert len(plain) == 8


def test_imagebind_phases_on_fresh_clips_train_and_resume(tmp_path: Path) -> None:
    """A fresh-clip phase runs through the same loop (a few steps, tiny batches) and resumes from its checkpoint."""
    from services.world.dataset import generate_split
    from services.world.pretrain.imagebind import Phase, pretrain_imagebind

    splits = {m: generate_split(m, 3, 4) for m in ("image", "video", "audio")}  # type: ignore[arg-type]
    phase = Phase(LoopConfig(steps=2, lr=1e-3, warmup=1, log_every=1), {"image": 2, "video": 4, "audio": 2},
                  fresh_clips=True, motion_groups=True)
    pretrain_imagebind(splits, (phase,), tmp_path, progress=False)  # type: ignore[arg-type]
    rows = [json.loads(line) for line in (tmp_path / "phase1" / LOSS_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["video"] > 0 for r in rows)
    longer = Phase(LoopConfig(steps=3, lr=1e-3, warmup=1, log_every=1), phase.batch_sizes, fresh_clips=True)
    pretrain_imagebind(splits, (longer,), tmp_path, progress=False)  # type: ignore[arg-type]
    rows = [json.loads(line) for line in (tmp_path / "phase1" / LOSS_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # resumed at step 2, not retrained from the start


@pytest.mark.parametrize(("modality", "counts"), [("image", {"image": 4, "video": 2}), ("audio", {"audio": 4})])
def test_invariance_phases_move_only_their_branch_toward_the_world_twin(tmp_path: Path, modality: str,
                                                                         counts: dict[str, int]) -> None:
    """Phases 6 and 7 on a fresh (random) ImageBind: pictures on backgrounds, and tones of other lengths, that
    they never trained on come out nearer to what the model gave their world twins before; nothing outside the
    trained branch changes."""
    from services.modeling.imagebind import build_imagebind
    from services.world.pretrain import invariance
    from services.world.pretrain.imagebind import WORLD_IMAGEBIND

    torch.manual_seed(0)
    model = build_imagebind(WORLD_IMAGEBIND).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = invariance.background_pairs if modality == "image" else invariance.tone_length_pairs
    held_out = pairs(modality, torch.Generator().manual_seed(123), 8)  # other samples than the steps' draws

    with torch.no_grad():
        target = invariance.branch_tokens(model, modality, held_out.world)  # the teacher's, before training

    def distance() -> float:
        with torch.no_grad():
            got = invariance.branch_tokens(model, modality, held_out.sent, held_out.views)
            return float(invariance.feature_distance(got, target))

    start = distance()
    phase = invariance.InvariancePhase(LoopConfig(steps=8, lr=1e-3, warmup=1, log_every=1), counts)
    invariance.distil(model, "test", pairs, phase, tmp_path, progress=False)
    end = distance()
    assert end < 0.5 * start, (start, end)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trained = tuple(p for m in counts for p in invariance.branch_prefixes(m))
    assert changed and all(k.startswith(trained) for k in changed), sorted(changed)[:5]
    assert all(p.requires_grad for p in model.parameters())  # the model is handed back as it came
    rows = [json.loads(line) for line in (tmp_path / LOSS_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and all(r[m] > 0 for r in rows for m in counts)


def test_the_imagebind_part_runs_its_seven_phases_and_exports_the_last(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`--part imagebind` with a tiny budget (and tiny batches): each of the seven phases gets its share of it (at
    least a step), phases 6 and 7 (the invariance phases) after the five InfoNCE ones, and what is exported is the
    model after phase 7."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from services.world.dataset import write_world
    from services.world.pretrain import imagebind, invariance
    from services.world.pretrain.parts import DEFAULT_STEPS, run_imagebind

    monkeypatch.setattr(imagebind, "IMAGEBIND_PHASES", tuple(
        replace(p, batch_sizes={m: 4 for m in p.batch_sizes}) for p in imagebind.IMAGEBIND_PHASES))
    for number, (distil, phase) in list(invariance.INVARIANCE_PHASES.items()):
        monkeypatch.setitem(invariance.INVARIANCE_PHASES, number,
                            (distil, replace(phase, counts={m: 2 for m in phase.counts})))

    write_world(tmp_path / "data", 3, {"image": 4, "video": 4, "audio": 4}, progress=False)
    result = run_imagebind(tmp_path / "data", tmp_path / "work", steps=7, seed=0, progress=False)
    folder = tmp_path / "work" / "imagebind"
    steps = {n: [json.loads(line)["step"] for line in (folder / f"phase{n}" / LOSS_LOG).read_text().splitlines()]
             for n in range(1, 8)}
    recipe = [p.loop.steps for p in imagebind.IMAGEBIND_PHASES] + [
        p.loop.steps for _, (_, p) in sorted(invariance.INVARIANCE_PHASES.items())]
    assert DEFAULT_STEPS["imagebind"] == sum(recipe)  # `--part imagebind` without --steps runs the whole recipe
    # The loss log gets a phase's last step (and every tenth): the step each phase ended at.
    assert {n: logged[-1] for n, logged in steps.items()} == {
        n: max(1, s * 7 // sum(recipe)) for n, s in enumerate(recipe, start=1)}
    assert set(json.loads((folder / "phase7" / LOSS_LOG).read_text())) >= {"audio"}
    # Phase 6 holds the world's own pictures and clips where they were (its anchor), phase 7 needs none.
    assert set(json.loads((folder / "phase6" / LOSS_LOG).read_text())) >= {"image", "video", "image_world",
                                                                           "video_world"}
    assert "audio_world" not in json.loads((folder / "phase7" / LOSS_LOG).read_text())
    exported = load_file(str(result.exported))
    final = torch.load(folder / "phase7" / CHECKPOINT, weights_only=False)["module"]
    assert all(torch.equal(exported[k], final[k]) for k in exported)


def test_invariance_command_rewrites_only_the_bundles_vision_and_audio_towers(tmp_path: Path,
                                                                             tiny_bundle_dir: Path) -> None:
    """`nextgpt world invariance` on a trained bundle: phases 6 and 7 change its ImageBind's vision and audio
    branches and nothing else of the bundle, keep the weights' dtype, tag the manifest's version, and the bundle
    still loads; an unknown phase is refused."""
    import shutil

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from services.bundle.loader import load_bundle
    from services.cli.main import app

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle)
    weights = load_bundle(bundle).path(load_bundle(bundle).manifest.encoder.weights)
    before = load_file(str(weights))
    others = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file() and p not in (weights, bundle / "bundle.json")}
    result = CliRunner().invoke(app, ["world", "invariance", "--bundle", str(bundle), "--work", str(tmp_path / "w"),
                                      "--steps", "2"])
    assert result.exit_code == 0, result.output
    after = load_file(str(weights))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k.split(".")[1] for k in changed} == {"vision", "audio"}
    assert all(after[k].dtype == before[k].dtype for k in before) and set(after) == set(before)
    assert all(p.read_bytes() == data for p, data in others.items())
    assert load_bundle(bundle).manifest.version.endswith("+imagebind-phase6-phase7")
    refused = CliRunner().invoke(app, ["world", "invariance", "--bundle", str(bundle), "--work", str(tmp_path / "w"),
                                       "--phase", "5"])
    assert refused.exit_code == 2 and "unknown phases [5]" in refused.output


def test_the_picture_vae_part_refines_its_decoder_over_an_unchanged_encoder(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`--part picture-vae`: the joint phase, then the decoder phase with its share of the budget (400 of 300
    steps: 4 for 3). What is exported has the joint phase's encoder and scaling factor, so the latents the UNets
    learn are the same, and a decoder the second phase trained."""
    from dataclasses import replace

    from diffusers import AutoencoderKL

    from services.world.dataset import write_world
    from services.world.pretrain import vae_decoder
    from services.world.pretrain.parts import run_picture_vae

    monkeypatch.setattr(vae_decoder, "DECODER_PHASE", replace(vae_decoder.DECODER_PHASE, batch_size=4))
    write_world(tmp_path / "data", 3, {"image": 8, "video": 4}, progress=False)
    result = run_picture_vae(tmp_path / "data", tmp_path / "work", steps=3, seed=0, progress=False)
    folder = tmp_path / "work" / "picture-vae"
    logged = [json.loads(line) for line in (folder / "decoder" / LOSS_LOG).read_text().splitlines()]
    assert logged[-1]["step"] == 4 and all(row["recon"] > 0 for row in logged)
    joint = torch.load(folder / CHECKPOINT, weights_only=False)["module"]
    exported = AutoencoderKL.from_pretrained(str(result.exported))
    state = exported.state_dict()
    encoder = [k for k in joint if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in joint if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and all(torch.equal(state[k], joint[k]) for k in encoder)
    assert any(not torch.equal(state[k], joint[k]) for k in decoder)
    assert result.metrics["scaling_factor"] == exported.config.scaling_factor


def test_vae_decoder_command_rewrites_only_the_picture_vaes_decoder(tmp_path: Path, tiny_bundle_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`nextgpt world vae-decoder` on a trained bundle: the image decoder's VAE gets a new decoder and keeps its
    encoder and dtype (fp16, as packed); the clip decoder gets the same VAE where it shared it, and is left alone
    where it has its own; nothing else of the bundle changes; the manifest's version says so once."""
    import shutil
    from dataclasses import replace

    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from services.bundle.loader import load_bundle
    from services.cli.main import app
    from services.world.pretrain import vae_decoder

    # No warm-up: the first steps' rates (a 50th of the rate) move no fp16 weight.
    phase = vae_decoder.DECODER_PHASE
    monkeypatch.setattr(vae_decoder, "DECODER_PHASE", replace(phase, batch_size=2, loop=replace(phase.loop, warmup=1)))
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle)
    image, video = (bundle / "decoders" / m / "vae" / vae_decoder.WEIGHTS for m in ("image", "video"))
    save_file({k: v.half() for k, v in load_file(str(image)).items()}, str(image))  # as a packed bundle keeps it

    def refine(work: str) -> None:
        untouched = {p: p.read_bytes() for p in bundle.rglob("*")
                     if p.is_file() and p not in (image, video, bundle / "bundle.json")}
        result = CliRunner().invoke(app, ["world", "vae-decoder", "--bundle", str(bundle), "--work",
                                          str(tmp_path / work), "--steps", "2"])
        assert result.exit_code == 0, result.output
        assert all(p.read_bytes() == data for p, data in untouched.items())

    before, own_video = {k: v.clone() for k, v in load_file(str(image)).items()}, video.read_bytes()
    refine("w1")  # the tiny bundle's clip decoder has a VAE of its own
    after = load_file(str(image))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert set(after) == set(before) and all(after[k].dtype == torch.float16 for k in before)
    assert video.read_bytes() == own_video

    shutil.copytree(image.parent, video.parent, dirs_exist_ok=True)  # one VAE for both, as the world's
    refine("w2")
    assert image.read_bytes() == video.read_bytes() and not torch.equal(load_file(str(image))["decoder.conv_in.weight"],
                                                                        after["decoder.conv_in.weight"])
    assert load_bundle(bundle).manifest.version.endswith("+vae-decoder")
    assert load_bundle(bundle).manifest.version.count("+vae-decoder") == 1
    shutil.rmtree(image.parent)
    refused = CliRunner().invoke(app, ["world", "vae-decoder", "--bundle", str(bundle), "--work", str(tmp_path / "w3")])
    words = " ".join(refused.output.replace("│", " ").split())  # the message wraps in rich's box
    assert refused.exit_code == 2 and "no picture VAE (the image decoder's 'vae' folder) to refine" in words
