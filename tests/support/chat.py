"""Helpers for tests that talk to the gateway: read an SSE stream, follow a job."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx


def read_events(response: httpx.Response | Iterator[str], after: int = 0) -> list[tuple[str, dict[str, object]]]:
    """(event name, data) of every SSE event (of the response, or of the rest of its ``iter_lines``); checks that
    ids are consecutive (from ``after`` + 1)."""
    events, name, last_id = [], "", after
    for line in (response.iter_lines() if isinstance(response, httpx.Response) else response):
        if line.startswith("id: "):
            assert int(line[4:]) == last_id + 1
            last_id = int(line[4:])
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def first_job_id(response: httpx.Response) -> str | None:
    """Read the stream until the first decode job appears, and stop reading there."""
    return read_until_job(response)[0]


def read_until_job(response: httpx.Response) -> tuple[str | None, int]:
    """(first decode job id, id of the event that carried it): reads no further."""
    last_id = 0
    for line in response.iter_lines():
        if line.startswith("id: "):
            last_id = int(line[4:])
        elif line.startswith("data: ") and "job_id" in line:
            return str(json.loads(line[6:])["job_id"]), last_id
    return None, last_id


def wait_for_job_state(url: str, job_id: str, headers: dict[str, str], state: str, timeout: float = 60) -> str:
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline and seen != state:
        seen = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers).json()["state"]
        time.sleep(0.2)
    return seen
