"""Redis clients that ride out a Redis restart: every command is retried on connection errors with exponential
backoff for about 15 s before the error reaches the caller (a restart with AOF takes a second or two)."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 2 x 6 s: ~15 s of retrying.
_RETRIES = 11
_ERRORS: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError]


def sync_redis(url: str) -> Any:
    from redis.retry import Retry

    return redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), _RETRIES),
                                retry_on_error=_ERRORS)


def async_redis(url: str, max_connections: int = 1024, wait_s: float = 20.0) -> Any:
    """Connections are held only in blocking reads: one per chat stream read on a replica other than the one
    producing it (a resumed stream), and one per process for all the decode jobs it follows; everything else borrows
    a connection for one round trip. The bound is what caps resumed streams per replica (about ``max_connections``),
    and a caller past it waits up to ``wait_s`` for a free connection instead of failing."""
    from redis.asyncio.retry import Retry

    # The retry policy belongs to the connections the pool makes (a client given a pool does not pass it on).
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=wait_s,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), _RETRIES), retry_on_error=_ERRORS)
    return redis.asyncio.Redis(connection_pool=pool)
