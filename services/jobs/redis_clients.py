"""Redis clients that ride out a Redis restart: every command is retried on connection errors with exponential
backoff for about 15 s before the error reaches the caller (a restart with AOF takes a second or two).

A Redis that holds its connections and answers nothing (a stopped process, a network that drops packets) is another
matter: each command gives up after ``SOCKET_TIMEOUT_S`` and is not retried, so the caller fails in seconds instead
of waiting out eleven timeouts (over a minute; without a socket timeout, as redis-py before 8 had, forever)."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

# 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 2 x 6 s: ~15 s of retrying.
_RETRIES = 11
# A restart refuses or resets connections (a Redis loading its AOF answers LOADING, a ConnectionError too). Not
# timeouts, which the policy's default would retry too.
_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, ConnectionError)
# Above the longest blocking read (the stream log's XREAD BLOCK 2000 ms, the job reader's 100 ms).
SOCKET_TIMEOUT_S = 5.0


def sync_redis(url: str) -> Any:
    from redis.retry import Retry

    retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), _RETRIES, supported_errors=_ERRORS)
    return redis.Redis.from_url(url, retry=retry, retry_on_error=_ERRORS, socket_timeout=SOCKET_TIMEOUT_S,
                                socket_connect_timeout=SOCKET_TIMEOUT_S)


def async_redis(url: str, max_connections: int = 1024, wait_s: float = 20.0) -> Any:
    """Connections are held only in blocking reads: one per chat stream read on a replica other than the one
    producing it (a resumed stream), and one per process for all the decode jobs it follows; everything else borrows
    a connection for one round trip. The bound is what caps resumed streams per replica (about ``max_connections``),
    and a caller past it waits up to ``wait_s`` for a free connection instead of failing."""
    from redis.asyncio.retry import Retry

    # The retry policy belongs to the connections the pool makes (a client given a pool does not pass it on).
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), _RETRIES, supported_errors=_ERRORS)
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=wait_s, retry=retry, retry_on_error=_ERRORS,
        socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S)
    return redis.asyncio.Redis(connection_pool=pool)
