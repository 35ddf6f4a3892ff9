"""The CLI refuses arguments outside what its commands can do with a usage error naming the option (exit 2), before
loading anything: a negative count, seed or step number, a port out of range, an evaluation part it has no
weights for. Before, some ran to a traceback deep inside (``world data --images -1``: numpy's ValueError; ``world
eval`` without ``--work``, with its default parts: a ValueError for the retrieval it cannot do), others went on
silently (``train ... --steps -1`` wrote a bundle trained for no step)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli.main import app


@pytest.mark.parametrize(("args", "option"), [
    (["world", "data", "--out", "{tmp}/w", "--images", "-1"], "--images"),
    (["world", "data", "--out", "{tmp}/w", "--videos", "0"], "--videos"),  # pretraining stacked no sample
    (["world", "data", "--out", "{tmp}/w", "--seed", "-3"], "--seed"),
    (["world", "pretrain", "--data", "{tmp}", "--work", "{tmp}/w", "--steps", "0"], "--steps"),
    (["world", "eval", "--bundle", "{tmp}"], "--work"),
    (["world", "eval", "--bundle", "{tmp}", "--work", "{tmp}"], "--work"),  # no pretrained ImageBind in it
    (["world", "eval", "--bundle", "{tmp}", "--part", "colour"], "--part"),
    (["world", "eval", "--bundle", "{tmp}", "--part", "image", "--steps", "0"], "--steps"),
    (["world", "eval", "--bundle", "{tmp}/missing", "--part", "image"], "--bundle"),
    (["train", "align-encoder", "--bundle", "{tmp}", "--data", "{tmp}", "--out", "{tmp}/o", "--steps", "-1"],
     "--steps"),
    (["train", "instruct", "--bundle", "{tmp}", "--data", "{tmp}", "--out", "{tmp}/o", "--lora-rank", "0"],
     "--lora-rank"),
    (["serve", "--port", "70000"], "--port"),
    (["encoder", "serve", "--port", "0"], "--port"),
    (["eval", "world", "--count", "0"], "--count"),
])
def test_arguments_out_of_range_are_usage_errors_naming_the_option(tmp_path: Path, args: list[str],
                                                                   option: str) -> None:
    result = CliRunner().invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output
