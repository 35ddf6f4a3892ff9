"""Server-sent events: named events with ids, JSON data, and comment heartbeats."""

from __future__ import annotations

import json


def sse_event(event_id: int, name: str, data: dict[str, object]) -> bytes:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


HEARTBEAT = b": ping\n\n"
