"""The Dockerfiles, checked without a Docker engine: non-root, pinned, healthchecks, no model inside, and the
slim gateway image's requirement list really covers what the gateway process imports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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


def test_the_slim_gateway_requirements_cover_what_it_imports(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    # Build the distributed gateway app (S3 store, Celery client) in a fresh interpreter and list the
    # distributions behind every module it loaded; each must be in the requirement list or a dependency of it.
    probe = """
import importlib.metadata as md, json, sys
import uvicorn
from services.cli.compose import distributed_gateway_app, resolve_bundle
from services.contracts.settings import load_settings
settings = load_settings()
distributed_gateway_app(settings, resolve_bundle(settings))
owners = md.packages_distributions()
print(json.dumps(sorted({d for m in list(sys.modules) for d in owners.get(m.split('.')[0], [])}), indent=None))
print(json.dumps(sorted(m for m in ('torch', 'transformers', 'diffusers', 'peft') if m in sys.modules)))
"""
    env = {**os.environ, "NEXTGPT_ENCODER__URL": "http://encoder:8001", "NEXTGPT_LLM__URL": "http://llm:8002",
           "NEXTGPT_STORAGE__BACKEND": "s3", "NEXTGPT_STORAGE__S3_BUCKET": "artifacts",
           "NEXTGPT_STORAGE__S3_ENDPOINT_URL": "http://127.0.0.1:1", "NEXTGPT_CACHE_DIR": str(tmp_path),
           "NEXTGPT_BUNDLE": str(tiny_bundle_dir)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    imported_lines = out.stdout.strip().splitlines()
    imported, heavy = set(json.loads(imported_lines[-2])), json.loads(imported_lines[-1])
    assert heavy == [], "the gateway must not load model libraries"
    listed = _requirement_closure(DOCKER / "requirements-gateway.txt")
    missing = sorted(_norm(d) for d in imported if _norm(d) not in listed | {"nextgpt-serve", "setuptools"})
    assert missing == []


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_closure(path: Path) -> set[str]:
    import importlib.metadata as md

    from packaging.requirements import Requirement

    todo = [Requirement(line) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    for req in todo:
        assert str(req.specifier).startswith("=="), f"{req} is not pinned"
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if name in seen:
            continue
        seen.add(name)
        for dep in md.requires(req.name) or []:
            sub = Requirement(dep)
            extras_ok = sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""}))
            if extras_ok:
                todo.append(sub)
    return seen
