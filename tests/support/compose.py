"""What ``docker compose config`` does before validation, for machines without Docker: YAML with merge keys,
then variable interpolation with the Compose rules (``$$``, ``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?msg}``,
``${V?msg}``, ``${V:+x}``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(ValueError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        unset_or_empty = not value
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else value is None) else value or ""
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else value is None:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return value or ""
        if op in (":+", "+"):
            return arg if not (unset_or_empty if op == ":+" else value is None) else ""
        return value or ""

    return _VAR.sub(one, text)


def _walk(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_walk(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _walk(value, env) for key, value in node.items()}
    return node


def load_compose(path: Path, env: dict[str, str]) -> dict[str, Any]:
    """The compose model as Compose sees it: anchors and merge keys resolved, variables interpolated,
    ``x-`` extension fields dropped."""
    raw = yaml.safe_load(path.read_text())
    model = _walk(raw, env)
    return {key: value for key, value in model.items() if not key.startswith("x-")}
