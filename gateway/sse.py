"""Server-sent events: named events with ids, JSON data, and comment heartbeats."""

from __future__ import annotations

import json


def sse_event(event_id: int | None, name: str, data: dict[str, object]) -> bytes:
    """``event_id`` None: an event that is not part of the replayable stream (the client keeps its last id)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


HEARTBEAT = b": ping\n\n"
