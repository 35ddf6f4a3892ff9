"""The Dockerfiles, checked without a Docker engine: non-root, pinned, healthchecks, no model inside, and the
slim gateway image's requirement list really covers what the gateway process imports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def _stages(path: Path) -> dict[str, list[str]]:
    """Instructions of each build stage (continuation lines joined), by stage name (or index)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            match = re.search(r"\bAS\s+(\S+)", line, re.I)
            current = [line]
            stages[match[1] if match else str(len(stages))] = current
        else:
            current.append(line)
    return stages


def _chain(stages: dict[str, list[str]], name: str) -> list[str]:
    """A stage's instructions with those of the stages it builds on."""
    base = stages[name][0].split()[1]
    return (_chain(stages, base) if base in stages else []) + stages[name]


def _final_targets(stages: dict[str, list[str]]) -> list[str]:
    bases = {lines[0].split()[1] for lines in stages.values()}
    return [name for name in stages if name not in bases]


def test_there_is_an_image_per_role() -> None:
    targets = {p.name: _final_targets(_stages(p)) for p in DOCKERFILES}
    assert targets["models.Dockerfile"] == ["encoder", "decoder", "llm"]
    assert {"gateway.Dockerfile", "vllm.Dockerfile"} <= set(targets)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_target_is_pinned_non_root_and_has_a_healthcheck(dockerfile: Path) -> None:
    stages = _stages(dockerfile)
    for name in _final_targets(stages):
        lines = _chain(stages, name)
        for line in lines:
            if line.upper().startswith("FROM "):
                image = line.split()[1]
                assert image in stages or re.search(r":[\w.-]*\d[\w.-]*$", image), f"{name}: unpinned {image}"
            for command in re.findall(r"pip install ([^&]*)", line):
                words = command.split()
                # Options and their values, the project itself ('.') and requirement files are not packages.
                packages = [w for i, w in enumerate(words) if not w.startswith("-") and w != "."
                            and not (i and words[i - 1] in ("-r", "--index-url", "--extra-index-url"))]
                assert all("==" in p for p in packages), f"{name}: unpinned {packages}"
        users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), f"{name} runs as root"
        assert any(line.upper().startswith("HEALTHCHECK ") for line in lines), f"{name} has no HEALTHCHECK"
        assert any(line.upper().startswith(("CMD ", "ENTRYPOINT ")) for line in lines), name
        copied = " ".join(line for line in lines if line.upper().startswith(("COPY ", "ADD ")))
        assert not re.search(r"\b(\.cache|bundle|weights|\.safetensors|\.pt)\b", copied), f"{name} bakes in a model"


def test_the_build_context_leaves_models_and_environments_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".cache", ".venv", ".venv-vllm", ".git"} <= set(ignored)


def test_compose_builds_targets_that_exist() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        build = service.get("build")
        if not build:
            continue
        stages = _stages(ROOT / build["dockerfile"])
        assert build.get("target", _final_targets(stages)[0]) in stages, name


def test_the_gateway_requirement_list_is_pinned() -> None:
    lines = [line for line in (DOCKER / "requirements-gateway.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9._-]+(\[[\w,]+\])?==[\w.]+", line) for line in lines), lines
    assert not any(line.lower().startswith(("torch", "transformers", "diffusers", "peft")) for line in lines)
