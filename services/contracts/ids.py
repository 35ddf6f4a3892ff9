"""The ids this server hands out (streams, decode jobs, conversations: ``uuid4().hex``) and their one check: a
path or a body naming anything else names something that is not there."""

from __future__ import annotations

import re

HEX_ID_PATTERN = r"^[0-9a-f]{32}$"  # for pydantic fields (whose ``$`` is the end of the text)
_HEX_ID = re.compile(r"[0-9a-f]{32}")


def is_hex_id(value: object) -> bool:
    # fullmatch: ``re``'s ``$`` also matches before a final newline, so an id with "\n" appended would pass.
    return isinstance(value, str) and _HEX_ID.fullmatch(value) is not None
