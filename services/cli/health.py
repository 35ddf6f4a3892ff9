"""Checks behind ``nextgpt health``: each returns None when healthy, else what is wrong, in one line."""

from __future__ import annotations


def check_url(url: str, timeout_s: float) -> str | None:
    import httpx

    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return f"{url}: {type(exc).__name__}: {exc}"
    return None if response.is_success else f"{url}: HTTP {response.status_code}"


def check_redis(url: str, timeout_s: float) -> str | None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"redis: {type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None
