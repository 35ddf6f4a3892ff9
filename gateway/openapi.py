"""Request bodies in the OpenAPI document. The chat routes parse their bodies themselves (JSON or multipart with
a JSON part, limits enforced while reading), so FastAPI cannot infer them: they are declared here, so clients,
generators and the property-based tests see the real request shapes."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from gateway.openai_compat import OpenAIChatRequest
from services.contracts.chat import ChatRequest

_REF = "#/components/schemas/{model}"


def _register(components: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template=_REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        with warnings.catch_warnings():  # FastAPI warns of the GET/HEAD routes' shared ids, mended below
            warnings.filterwarnings("ignore", message="Duplicate Operation ID")
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _unique_operation_ids(doc.get("paths", {}))
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        paths = doc.get("paths", {})
        if "/v1/chat" in paths:
            paths["/v1/chat"]["post"]["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": _register(components, ChatRequest)},
                "multipart/form-data": {"schema": {
                    "type": "object", "required": ["request"],
                    "properties": {
                        "request": {"type": "string", "description": "The ChatRequest, as JSON"},
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                  "description": "Media the messages name in their `files`"},
                    },
                }},
            }}
        if "/v1/chat/completions" in paths:
            paths["/v1/chat/completions"]["post"]["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": _register(components, OpenAIChatRequest)}}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _unique_operation_ids(paths: dict[str, Any]) -> None:
    """A route serving GET and HEAD gets one operation id for both from FastAPI (it names it after one of the
    methods): the document is then invalid, and client generators drop or clash on the operations. Each method of
    such a route is named after itself."""
    operations = [(method, op) for item in paths.values() for method, op in item.items() if "operationId" in op]
    counts = Counter(op["operationId"] for _, op in operations)
    for method, op in operations:
        if counts[op["operationId"]] > 1:
            op["operationId"] = f"{op['operationId'].rsplit('_', 1)[0]}_{method}"
