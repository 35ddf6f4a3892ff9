"""The release's data formats (CC3M / WebVid / AudioCaps caption JSON, T2M instruction JSON) drive the same
stages: small files in those formats, written here with real media files, train the tiny bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.training.release_data import DataFormatError, read_caption_pairs, read_instructions
from services.training.runner import StageRun, train_stage
from services.world.api_eval import media_file
from services.world.render import render


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release")
    media = root / "media"
    media.mkdir()
    captions: dict[str, list[dict[str, str]]] = {"cc3m": [], "webvid": [], "audiocap": []}
    for i in range(12):
        for modality, key, fmt, ext in (("image", "image_name", "cc3m", "jpg"), ("video", "video_name", "webvid", "mp4"),
                                        ("audio", "audio_name", "audiocap", "wav")):
            sample = render(modality, 9, i)  # type: ignore[arg-type]
            name = f"{modality}_{i}.{'png' if ext == 'jpg' else ext}"
            (media / name).write_bytes(media_file(modality, sample.data))  # type: ignore[arg-type]
            captions[fmt].append({key: name, "caption": sample.caption})
    for fmt, rows in captions.items():
        (root / f"{fmt}.json").write_text(json.dumps(rows))
    t2m = []
    for row in captions["cc3m"]:
        t2m.append({"image_name": row["image_name"], "output_modality": "image", "conversation": [
            {"from": "human", "value": f"Could you show me a picture of {row['caption']}", "input_modality": "text"},
            {"from": "gpt", "value": "Sure, this is the picture you want.", "caption": row["caption"],
             "output_modality": "image"}]})
        t2m.append({"image_name": row["image_name"], "output_modality": "text", "conversation": [
            {"from": "human", "value": "What is in this image?", "input_modality": "image"},
            {"from": "gpt", "value": row["caption"], "output_modality": "text"}]})
    (root / "t2m.json").write_text(json.dumps(t2m))
    return root


def test_readers_take_the_release_layout_and_refuse_broken_records(release: Path, tmp_path: Path) -> None:
    pairs = read_caption_pairs(release / "webvid.json", release / "media")
    assert len(pairs) == 12 and pairs[0].modality == "video" and pairs[0].path.is_file()
    items = read_instructions(release / "t2m.json", release / "media")
    assert items[0].media is None and items[1].media == ("image", release / "media" / "image_0.png")
    (tmp_path / "bad.json").write_text(json.dumps([{"image_name": "nope.png", "caption": "x"}]))
    with pytest.raises(DataFormatError, match="does not exist"):
        read_caption_pairs(tmp_path / "bad.json", release / "media")
    (tmp_path / "bad2.json").write_text(json.dumps([{"conversation": [
        {"from": "gpt", "value": "Here.", "output_modality": "image"}]}]))
    with pytest.raises(DataFormatError, match="caption"):
        read_instructions(tmp_path / "bad2.json", release / "media")


@pytest.mark.parametrize(("stage", "data"), [("align-encoder", "cc3m.json"), ("align-encoder", "audiocap.json"),
                                             ("align-decoder", "webvid.json"), ("instruct", "t2m.json")])
def test_stages_train_on_release_files(tiny_bundle_dir: Path, release: Path, tmp_path: Path, stage: str,
                                       data: str) -> None:
    report = train_stage(StageRun(stage=stage, bundle=tiny_bundle_dir, data=release / data, out=tmp_path / "out",
                                  work=tmp_path / "work", steps=3, progress=False, pool_size=32,
                                  media_root=release / "media"))
    assert report["held_out_after"] and report["held_out_after"] != report["held_out_before"]
    assert (tmp_path / "out" / "bundle.json").is_file()


def test_data_that_is_not_training_data_is_a_clear_cli_error(tiny_bundle_dir: Path, release: Path,
                                                            tmp_path: Path) -> None:
    """`nextgpt train` with data it cannot use says what is wrong with it (exit 2, no traceback), before loading
    the bundle where it can tell."""
    from typer.testing import CliRunner

    from services.cli.main import app

    picture = release / "media" / "image_0.png"
    cases = [(tmp_path, "not a world folder"), (tmp_path / "nope.json", "does not exist"),
             (release / "cc3m.json", "needs --media-root"), (picture, "not readable JSON")]
    for data, said in cases:
        extra = ["--media-root", str(release / "media")] if data == picture else []
        result = CliRunner().invoke(app, ["train", "align-encoder", "--bundle", str(tiny_bundle_dir), "--data",
                                          str(data), "--out", str(tmp_path / "out"), *extra])
        assert result.exit_code == 2, (data, result.output)
        text = " ".join(result.output.replace("│", " ").split())  # the message as words, out of its box
        assert said in text and "Traceback" not in text, result.output
