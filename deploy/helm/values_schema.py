"""Writes deploy/helm/nextgpt/values.schema.json. The `config` part comes from the services' settings models, so
a setting added to the services appears in the chart's schema (and a misspelled key in a values file is refused
by `helm install`); the rest describes the chart's own blocks. Run: `make helm-schema` (CI checks it is current).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from services.contracts.settings import Settings

SCHEMA_PATH = Path(__file__).parent / "nextgpt" / "values.schema.json"

# Settings the chart sets itself (addresses of its own services, secrets by reference): not in `config`.
CHART_MANAGED = {
    "bundle", "cache_dir", "host", "port", "api_keys", "api_keys_file",
    "storage.backend", "storage.local_dir", "storage.s3_endpoint_url", "storage.s3_bucket", "storage.s3_region",
    "storage.s3_access_key_id", "storage.s3_secret_access_key",
    "redis.url", "encoder.url",
    "llm.url", "llm.backend", "llm.vllm_url", "llm.vllm_pooler_url",
    "gateway.url_signing_key", "decoders.metrics_port",
}


def _field_schema(model: type[BaseModel], name: str) -> dict[str, Any]:
    full = model.model_json_schema()
    schema = dict(full["properties"][name])
    for key in ("title", "default"):
        schema.pop(key, None)
    # null always means "the service's default" in the chart.
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        schema = {**{k: v for k, v in schema.items() if k != "anyOf"}, "anyOf": [*options, {"type": "null"}]}
    else:
        schema = {"anyOf": [{k: v for k, v in schema.items() if k != "description"}, {"type": "null"}],
                  **({"description": schema["description"]} if "description" in schema else {})}
    return schema


def config_schema() -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            group = {f: _field_schema(annotation, f) for f in annotation.model_fields
                     if f"{name}.{f}" not in CHART_MANAGED}
            properties[name] = {"type": "object", "additionalProperties": False, "properties": group}
        elif name not in CHART_MANAGED:
            properties[name] = _field_schema(Settings, name)
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "description": "Service settings (NEXTGPT_<GROUP>__<KEY>); null keeps the service's default"}


def _obj(properties: dict[str, Any], required: list[str] | None = None, closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if closed:
        schema["additionalProperties"] = False
    if required:
        schema["required"] = required
    return schema


STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT0 = {"type": "integer", "minimum": 0}
INT1 = {"type": "integer", "minimum": 1}
MAP = {"type": "object"}
LIST = {"type": "array"}
PROBE = _obj({"periodSeconds": INT1, "failureThreshold": INT1}, ["periodSeconds", "failureThreshold"])
RESOURCES = _obj({"requests": MAP, "limits": MAP, "claims": LIST})
PDB = _obj({"enabled": BOOL, "maxUnavailable": {"type": ["integer", "string"]}}, ["enabled"])
IMAGE = _obj({"repository": STR, "tag": STR}, ["repository"])
SCHEDULING = {"nodeSelector": {"type": "object", "additionalProperties": STR}, "tolerations": LIST, "affinity": MAP,
              "podAnnotations": MAP, "env": {"type": "array", "items": _obj({"name": STR}, ["name"], closed=False)},
              "terminationGracePeriodSeconds": INT0, "pdb": PDB}


def component(extra: dict[str, Any] | None = None, probes: bool = True) -> dict[str, Any]:
    props = {"enabled": BOOL, "replicas": INT0, "image": IMAGE, "resources": RESOURCES, "gpu": INT0, **SCHEDULING,
             **(extra or {})}
    if probes:
        props["probes"] = _obj({"startup": PROBE, "readiness": PROBE, "liveness": PROBE},
                               ["startup", "readiness", "liveness"])
    return _obj(props)


def values_schema() -> dict[str, Any]:
    persistence = _obj({"enabled": BOOL, "size": STR, "storageClass": STR})
    return {
        "$schema": "https://json-schema.org/draft-07/schema#",
        "title": "nextgpt chart values",
        **_obj({
            "nameOverride": STR, "fullnameOverride": STR,
            "image": _obj({"registry": STR, "tag": STR,
                           "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}),
            "imagePullSecrets": LIST,
            "serviceAccount": _obj({"create": BOOL, "name": STR, "annotations": MAP}),
            "podSecurityContext": MAP, "securityContext": MAP,
            "secrets": _obj({"existingSecret": {"type": "string", "minLength": 1},
                             "keys": _obj({k: STR for k in ("apiKeys", "urlSigningKey", "s3AccessKeyId",
                                                            "s3SecretAccessKey", "redisUrl")})},
                            ["existingSecret"]),
            "bundle": _obj({"mountPath": {"type": "string", "pattern": "^/"}, "existingClaim": STR, "subPath": STR,
                            "initContainer": _obj({"enabled": BOOL, "image": STR, "command": LIST,
                                                   "resources": RESOURCES}),
                            "emptyDirSizeLimit": STR}),
            "config": config_schema(),
            "gateway": component({
                "service": _obj({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "port": INT1}),
                "autoscaling": _obj({"enabled": BOOL, "minReplicas": INT1, "maxReplicas": INT1,
                                     "targetCPUUtilizationPercentage": INT1}),
                "ingress": _obj({"enabled": BOOL, "className": STR, "host": STR, "path": STR, "annotations": MAP,
                                 "tls": LIST}),
            }),
            "encoder": component(),
            "llm": component({"backend": {"enum": ["vllm", "transformers"]}}),
            "vllmModel": _obj({"servedModelName": STR, "path": STR, "maxModelLen": INT1, "dtype": STR,
                               "maxLoraRank": INT1,
                               "loras": {"type": "array", "items": _obj({"name": STR, "path": STR}, ["name", "path"])}}),
            "vllm": component({"gpuMemoryUtilization": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                               "extraArgs": {"type": "array", "items": STR}}),
            "pooler": component({"gpuMemoryUtilization": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}),
            "decoders": _obj({
                "common": component({"metricsPort": INT0}, probes=False),
                "queues": _obj({q: component({"minReplicaCount": INT0, "maxReplicaCount": INT1, "metricsPort": INT0},
                                             probes=False)
                                for q in ("image", "video", "audio")}),
            }),
            "keda": _obj({"enabled": BOOL, "operatorNamespace": STR, "pollingInterval": INT1, "cooldownPeriod": INT0,
                          "minReplicaCount": INT0, "maxReplicaCount": INT1, "listLength": INT1}),
            "redis": _obj({
                "bundled": _obj({"enabled": BOOL, "image": STR, "resources": RESOURCES, "persistence": persistence}),
                "external": _obj({"url": {"type": "string", "pattern": "^(rediss?://.*)?$"}, "urlFromSecret": BOOL,
                                  "address": STR}),
            }),
            "objectStorage": _obj({
                "bundled": _obj({"enabled": BOOL, "image": STR, "resources": RESOURCES, "persistence": persistence}),
                "bucket": {"type": "string", "minLength": 3, "maxLength": 63},
                "external": _obj({"endpointUrl": STR, "region": STR}),
            }),
            "metrics": _obj({"serviceMonitor": _obj({"enabled": BOOL, "interval": STR, "labels": MAP})}),
            "networkPolicy": _obj({"enabled": BOOL, "gatewayFrom": LIST, "metricsNamespaceSelector": MAP}),
        }),
    }


def render() -> str:
    return json.dumps(values_schema(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if SCHEMA_PATH.read_text() == render() else f"{SCHEMA_PATH} is stale: run `make helm-schema`")
    SCHEMA_PATH.write_text(render())
    print(f"wrote {SCHEMA_PATH}")
