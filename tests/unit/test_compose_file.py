"""docker-compose.yml checked the way ``docker compose config`` would (no Docker engine here): interpolation,
the Compose specification's JSON schema, and our own rules (secrets required, every setting wired, GPUs, health)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from check_jsonschema.builtin_schemas import get_builtin_schema

from services.contracts.settings import env_names, load_settings
from tests.support.compose import MissingVariable, interpolate, load_compose

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SECRETS = {"NEXTGPT_API_KEYS": "sk-a,sk-b", "MINIO_ROOT_USER": "nextgpt", "MINIO_ROOT_PASSWORD": "minio-secret-123",
           "NEXTGPT_GATEWAY__URL_SIGNING_KEY": "0123456789abcdef0123456789abcdef"}


def _services(profile: str) -> dict[str, dict[str, Any]]:
    services = load_compose(COMPOSE, SECRETS)["services"]
    return {name: s for name, s in services.items() if not s.get("profiles") or profile in s["profiles"]}


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("a$${SET}-${SET}-${EMPTY:-d}-${EMPTY-d}-${UNSET-d}-${SET:+x}-$SET", env) == "a${SET}-v-d--d-x-v"
    with pytest.raises(MissingVariable, match="EMPTY"):
        interpolate("${EMPTY:?say why}", env)


def test_the_file_matches_the_compose_specification() -> None:
    schema = get_builtin_schema("vendor.compose-spec")
    model = load_compose(COMPOSE, SECRETS)
    jsonschema.validate(model, schema)
    # The checker must see the mistakes people make in long files: a misspelled key, a made-up condition.
    for broken in ({"image": "a", "helthcheck": {}}, {"image": "a", "depends_on": {"redis": {"condition": "up"}}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**model, "services": {**model["services"], "x": broken}}, schema)


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(secret: str) -> None:
    with pytest.raises(MissingVariable, match=secret):
        load_compose(COMPOSE, {k: v for k, v in SECRETS.items() if k != secret})


def test_every_setting_the_services_read_is_wired() -> None:
    import yaml

    anchor = yaml.safe_load(COMPOSE.read_text())["x-nextgpt-env"]
    wired = {k for k in anchor if k.startswith("NEXTGPT_")}
    assert sorted(set(env_names()) - wired) == [], "settings missing from x-nextgpt-env"
    assert sorted(wired - set(env_names())) == [], "x-nextgpt-env sets variables no service reads"


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_each_service_gets_a_valid_configuration(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in _services(profile).items():
        env = service.get("environment")
        if not isinstance(env, dict) or "NEXTGPT_BUNDLE" not in env:
            continue
        for var in env_names():
            monkeypatch.delenv(var, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        settings = load_settings()  # raises ConfigurationError naming the variable
        assert settings.storage.backend == "s3" and settings.redis.url == "redis://redis:6379/0", name
        if name == "gateway":
            continue  # runs no model; its device settings are unused
        expected_device = "cuda" if profile == "gpu" else "cpu"
        assert settings.encoder.device == settings.llm.device == settings.decoders.device == expected_device, name
        assert settings.llm.backend == ("vllm" if profile == "gpu" else "transformers"), name


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_profiles_are_complete_and_healthy(profile: str) -> None:
    services = _services(profile)
    names = set(services)
    aliases = {a for s in services.values() for a in (s.get("networks", {}).get("default") or {}).get("aliases", [])}
    # The gateway and the LLM service reach their peers by these names in both profiles.
    assert {"redis", "minio", "gateway", "encoder", "llm"} <= names | aliases
    assert any("worker" in " ".join(s.get("command", [])) for s in services.values())
    for name, service in services.items():
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in load_compose(COMPOSE, SECRETS)["services"], f"{name} depends on unknown {dep}"
            if cond.get("required", True):
                assert cond["condition"] in ("service_healthy", "service_completed_successfully",
                                             "service_started"), name
        if service.get("restart") == "unless-stopped":
            assert "healthcheck" in service, f"{name} has no healthcheck"
        gpus = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if profile == "cpu" and "gpu" not in service.get("profiles", []):
            assert not gpus, f"{name} reserves a GPU in the CPU profile"
    if profile == "gpu":
        for name in ("encoder", "vllm", "vllm-pooler", "llm", "worker-image", "worker-video", "worker-audio"):
            devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia", name


def test_images_are_pinned_and_models_never_baked_in() -> None:
    for name, service in load_compose(COMPOSE, SECRETS)["services"].items():
        image = service.get("image", "")
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        assert tag and tag != "latest", f"{name}: unpinned image {image!r}"
        for volume in service.get("volumes", []):
            if ":/bundles" in volume:
                assert volume.endswith(":ro") or name == "bundle-tiny", f"{name} mounts the bundles writable"


def test_vllm_arguments_match_the_converted_bundle() -> None:
    # The LLM service asks vLLM for the bundle's name and LoRA names: the defaults must be the converter's.
    services = load_compose(COMPOSE, SECRETS)["services"]
    args = services["vllm"]["command"]
    assert "--served-model-name=nextgpt-7b-tiva-v0" in args and "--lora-modules=nextgpt=/bundles/tiny/lora/nextgpt" in args
    assert json.dumps(services["vllm-pooler"]["command"]).count("--lora=nextgpt=/bundles/tiny/lora/nextgpt") == 1
    assert services["gateway"]["environment"]["NEXTGPT_BUNDLE"] == "/bundles/tiny"
