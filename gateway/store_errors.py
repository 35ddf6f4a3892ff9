"""Redis (the gateway's store: conversations, streams, the job book in distributed mode) out of reach, as the public
API says it, before a response starts (a 503) and in a stream under way (its ``error`` event): retry later. Where
it is stays in the log; a client of the public API has no use for the address of the gateway's store."""

from __future__ import annotations

import logging

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.contracts.errors import ServiceUnavailableError

log = logging.getLogger(__name__)

# Unreachable, or holding a command past its socket timeout.
STORE_DOWN = (RedisConnectionError, RedisTimeoutError)
# A Redis that restarts is back in a second or two; one that hangs is given its socket timeout per command.
REDIS_RETRY_AFTER_S = 5


def store_unavailable(exc: BaseException) -> ServiceUnavailableError:
    log.warning("redis unavailable: %s: %s", type(exc).__name__, exc)
    return ServiceUnavailableError("the gateway's store is unavailable; retry later", code="redis_unavailable",
                                   retry_after_s=REDIS_RETRY_AFTER_S)
