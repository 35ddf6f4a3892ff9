"""The Helm chart, checked without a cluster: the real helm binary (lint, template with several values files),
Kubernetes' own schemas for what it renders, cross-references between the objects, and the settings wiring."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.contracts.settings import Settings, env_names

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "nextgpt"
VALUES_FILES = [None, *sorted((CHART / "ci").glob("*-values.yaml"))]
K8S_VERSIONS = ["1.29.0", "1.32.0"]
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor"}


@pytest.fixture(scope="module")
def helm() -> str:
    path = os.environ.get("NEXTGPT_TEST_HELM") or str(ROOT / ".tools" / "bin" / "helm")
    if not Path(path).is_file():
        pytest.fail(f"helm not found at {path}: run `make helm` (make test does)")
    return path


def _run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def render(helm: str, *args: str, chart: Path = CHART) -> list[dict[str, Any]]:
    out = _run(helm, "template", "rel", str(chart), "--namespace", "ns", *args)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _values_args(values: Path | None) -> list[str]:
    return ["-f", str(values)] if values else []


def _pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] == "Deployment":
            yield doc["metadata"]["name"], doc["spec"]["template"]


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda v: v.name if v else "defaults")
def test_lint_and_kubernetes_schemas(helm: str, values: Path | None) -> None:
    lint = _run(helm, "lint", str(CHART), "--strict", *_values_args(values))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(helm, *_values_args(values))
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda v: v.name if v else "defaults")
def test_objects_refer_to_each_other_correctly(helm: str, values: Path | None) -> None:
    docs = render(helm, *_values_args(values))
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    pods = dict(_pod_specs(docs))

    def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
            return False
        return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))

    for name, svc in by_kind.get("Service", {}).items():
        matched = [p for p in pods.values() if selects({"matchLabels": svc["spec"]["selector"]}, p["metadata"]["labels"])]
        assert matched, f"Service {name} selects no pod"
        ports = {port["containerPort"] for p in matched for c in p["spec"]["containers"] for port in c.get("ports", [])}
        assert all(port["targetPort"] in ports for port in svc["spec"]["ports"]), name
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for name, obj in by_kind.get(kind, {}).items():
            selector = obj["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]
            assert any(selects(selector, p["metadata"]["labels"]) for p in pods.values()), f"{kind} {name} selects nothing"
    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        target = hpa["spec"]["scaleTargetRef"]["name"]
        assert target in pods and "replicas" not in by_kind["Deployment"][target]["spec"], name
    for name, scaled in by_kind.get("ScaledObject", {}).items():
        target = scaled["spec"]["scaleTargetRef"]["name"]
        assert target in pods and "replicas" not in by_kind["Deployment"][target]["spec"], name
        queue = target.rsplit("-", 1)[-1]
        trigger = scaled["spec"]["triggers"][0]
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"].endswith(queue)
        assert int(trigger["metadata"]["listLength"]) >= 1 and ":" in trigger["metadata"]["address"]
    for name, monitor in by_kind.get("ServiceMonitor", {}).items():
        services = [s for s in by_kind["Service"].values() if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
        assert services and all(p["name"] == "http" for s in services for p in s["spec"]["ports"]), name
    for name, monitor in by_kind.get("PodMonitor", {}).items():  # decoder workers: their pods' `metrics` port
        scraped = [p for p in pods.values() if selects(monitor["spec"]["selector"], p["metadata"]["labels"])]
        assert scraped, f"PodMonitor {name} selects no pod"
        for pod in scraped:
            (container,) = pod["spec"]["containers"]
            port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["NEXTGPT_DECODERS__METRICS_PORT"] == str(port), name
    configmaps = set(by_kind.get("ConfigMap", {}))
    for name, pod in pods.items():
        for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps, name
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod["spec"]["volumes"]}, name
        for volume in pod["spec"]["volumes"]:
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and volume["name"] != "bundle":
                assert claim in by_kind.get("PersistentVolumeClaim", {}), f"{name}: claim {claim} is not rendered"


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda v: v.name if v else "defaults")
def test_pods_are_hardened_and_model_pods_wait_for_their_models(helm: str, values: Path | None) -> None:
    docs = render(helm, *_values_args(values))
    for name, pod in _pod_specs(docs):
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False, name
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["resources"].get("requests"), f"{name} has no resource requests"
            if name.endswith(("-encoder", "-llm", "-vllm", "-pooler")):
                startup = container["startupProbe"]
                # Model loading: at least 10 minutes before liveness may restart the pod.
                assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, name
                assert container["readinessProbe"]["httpGet"]["path"] in ("/readyz", "/health"), name
        bundle = [v for v in spec["volumes"] if v["name"] == "bundle"]
        mounts = [m for c in spec["containers"] for m in c["volumeMounts"] if m["name"] == "bundle"]
        assert all(m["readOnly"] for m in mounts), f"{name} mounts the bundle writable"
        assert not bundle or "persistentVolumeClaim" in bundle[0] or spec.get("initContainers"), name


def test_gpu_requests_follow_the_values(helm: str) -> None:
    pods = dict(_pod_specs(render(helm)))
    gpus = {name.removeprefix("rel-nextgpt-"): pod["spec"]["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
            for name, pod in pods.items()}
    assert gpus == {"gateway": 0, "encoder": 1, "llm": 0, "vllm": 1, "pooler": 1, "worker-image": 1,
                    "worker-video": 1, "worker-audio": 1, "redis": 0, "minio": 0}
    tiny = dict(_pod_specs(render(helm, "-f", str(CHART / "ci" / "tiny-cpu-values.yaml"))))
    assert all("nvidia.com/gpu" not in p["spec"]["containers"][0]["resources"].get("limits", {}) for p in tiny.values())


def _gateway_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = dict(_pod_specs(docs))["rel-nextgpt-gateway"]
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env", [])}


def test_the_gateway_ends_its_replies_before_its_pod_is_killed(helm: str) -> None:
    """Its stop grace follows the pod's (less the time the replies need to end with server_stopping and the
    server to exit), unless the operator sets it."""
    pods = dict(_pod_specs(render(helm)))
    grace = pods["rel-nextgpt-gateway"]["spec"]["terminationGracePeriodSeconds"]
    assert _gateway_env(render(helm))["NEXTGPT_GATEWAY__SHUTDOWN_GRACE_S"] == str(grace - 15)
    assert _gateway_env(render(helm, "--set", "gateway.terminationGracePeriodSeconds=40")
                        )["NEXTGPT_GATEWAY__SHUTDOWN_GRACE_S"] == "25"
    docs = render(helm, "--set", "config.gateway.shutdown_grace_s=7")
    assert "NEXTGPT_GATEWAY__SHUTDOWN_GRACE_S" not in _gateway_env(docs)
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "rel-nextgpt-config")
    assert config["data"]["NEXTGPT_GATEWAY__SHUTDOWN_GRACE_S"] == "7"


def _sample(schema: dict[str, Any]) -> Any:
    """A valid, non-null value for a settings field's schema."""
    option = next(o for o in schema.get("anyOf", [schema]) if o.get("type") != "null")
    if "enum" in option:
        return option["enum"][-1]
    kind = option.get("type")
    if kind == "array":
        return ["10.0.0.1"]
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        low = option.get("minimum", option.get("exclusiveMinimum", 0))
        return max(int(low) + 1, 2) if kind == "integer" else float(low) + 1.5
    if option.get("pattern", "").startswith("^https?"):
        return "https://api.example.com"
    if option.get("pattern", "").startswith("^(auto|"):  # a CPU list
        return "auto"
    if "pattern" in option:
        return "tenant-a/"
    return "value"


def _schema_module() -> Any:
    spec = importlib.util.spec_from_file_location("values_schema", ROOT / "deploy" / "helm" / "values_schema.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_the_services_read_is_wired(helm: str, tmp_path: Path) -> None:
    """Set every key of `config` (the schema is generated from the settings models) and render: every NEXTGPT_
    variable reaches the containers, either from the ConfigMap or set by the chart itself."""
    schema = _schema_module().config_schema()
    config: dict[str, Any] = {}
    for key, prop in schema["properties"].items():
        if prop.get("type") == "object":
            config[key] = {field: _sample(s) for field, s in prop["properties"].items()}
        else:
            config[key] = _sample(prop)
    config["log_level"] = "debug"
    values = tmp_path / "all-settings.yaml"
    values.write_text(yaml.safe_dump({"config": config}))
    docs = render(helm, "-f", str(values))
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    wired = set(configmap)
    for _, pod in _pod_specs(docs):
        for container in pod["spec"]["containers"]:
            wired |= {e["name"] for e in container.get("env", []) if e["name"].startswith("NEXTGPT_")}
    # API keys reach the gateway as a mounted file (NEXTGPT_API_KEYS_FILE), never as an env value in the pod spec.
    assert sorted(set(env_names()) - wired) == ["NEXTGPT_API_KEYS"]
    # And the values survive the trip: what the ConfigMap holds is what the services parse.
    # (The chart sets the store itself, always S3: MinIO or the operator's.)
    os_env = {**configmap, "NEXTGPT_LLM__BACKEND": "transformers", "NEXTGPT_STORAGE__BACKEND": "s3",
              "NEXTGPT_STORAGE__S3_BUCKET": "nextgpt"}
    settings = Settings(**_nested(os_env))
    assert settings.encoder.max_batch == config["encoder"]["max_batch"]
    assert settings.gateway.trusted_proxies == ["10.0.0.1"]
    assert settings.storage.s3_prefix == "tenant-a/"


def _nested(env: dict[str, str]) -> dict[str, Any]:
    """NEXTGPT_ variables -> Settings keyword arguments, as pydantic-settings would read them."""
    import json

    out: dict[str, Any] = {}
    for name, raw in env.items():
        parts = name.removeprefix("NEXTGPT_").lower().split("__")
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        value: Any = raw
        if raw.startswith("["):
            value = json.loads(raw)
        target[parts[-1]] = value
    return out


@pytest.mark.parametrize(("override", "complaint"), [
    ("config.encoder.max_bach=3", "max_bach"),
    ("config.encoder.max_batch=0", "max_batch"),
    ("llm.backend=tgi", "backend"),
    ("secrets.existingSecret=", "existingSecret"),
    ("objectStorage.bucket=ab", "bucket"),
])
def test_bad_values_are_refused_with_the_key_named(helm: str, override: str, complaint: str) -> None:
    out = _run(helm, "template", "rel", str(CHART), "--set", override)
    assert out.returncode != 0 and complaint in out.stderr


def test_external_redis_needs_an_address(helm: str) -> None:
    out = _run(helm, "template", "rel", str(CHART), "--set", "redis.bundled.enabled=false")
    assert out.returncode != 0 and "redis.external.url is required" in out.stderr


def test_notes_tell_the_operator_what_to_create(helm: str, tmp_path: Path) -> None:
    chart = tmp_path / "nextgpt"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "notes-check.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: {{ include "nextgpt.notes" . | quote }}\n')
    docs = render(helm, "-f", str(CHART / "ci" / "production-values.yaml"), "--show-only", "templates/notes-check.yaml",
                  chart=chart)
    notes = docs[0]["data"]["notes"]
    assert "create secret generic nextgpt-prod" in notes and "redis-url=" in notes
    assert "https://api.example.com/nextgpt" in notes and "nextgpt-prod:<queue>" in notes


def test_values_schema_is_generated_from_the_current_settings() -> None:
    module = _schema_module()
    assert (CHART / "values.schema.json").read_text() == module.render(), "run `make helm-schema`"


def test_k8s_manifests_are_the_chart_rendered_with_defaults(helm: str) -> None:
    out = _run(helm, "template", "nextgpt", str(CHART), "--namespace", "nextgpt")
    assert out.returncode == 0, out.stderr
    assert (ROOT / "k8s" / "nextgpt.yaml").read_text() == out.stdout, "k8s/ is stale: run `make k8s`"
