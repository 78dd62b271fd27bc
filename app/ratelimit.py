"""Rate limits (429 with Retry-After): per tenant, and per client address for requests with bad keys.

Counted in one-minute windows with the sliding-window estimate (this window's count plus the
previous window's, weighted by how much of it still overlaps the last 60 s). With Redis
configured (MODELPRESS_REDIS_URL, or a redis:// broker URL) the counters live in Redis, so
every API process shares them; otherwise, or while Redis does not answer, each process counts
on its own.

Bad keys: an address that sent more than MODELPRESS_RATE_LIMIT_INVALID_KEYS_PER_MINUTE requests
with a missing or unknown key gets 429 before its key is even looked up, so keys cannot be
guessed faster than that (a valid key from that address waits out the window too).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from functools import lru_cache
from typing import Any

from app.config import get_settings
from app.errors import RateLimited

WINDOW_S = 60
_PREFIX = "modelpress:rate"
log = logging.getLogger(__name__)

_lock = threading.Lock()
# in-process counters: key -> {window number: count}; only the current and previous windows are kept
_buckets: dict[str, dict[int, int]] = {}


@lru_cache(maxsize=4)
def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def _local(key: str, window: int, add: int) -> tuple[int, int]:
    with _lock:
        counts = _buckets.setdefault(key, {})
        for old in [w for w in counts if w < window - 1]:
            del counts[old]
        counts[window] = counts.get(window, 0) + add
        return counts[window], counts.get(window - 1, 0)


def _counts(key: str, window: int, add: int) -> tuple[int, int]:
    """(this window's count after adding `add`, the previous window's count)."""
    return _counts_many([(key, add)], window)[0]


def _counts_many(requests: list[tuple[str, int]], window: int) -> list[tuple[int, int]]:
    """_counts for several keys in one Redis round trip (a pipeline), or in this process."""
    url = get_settings().rate_limit_redis_url
    if url:
        try:
            pipe = _redis(url).pipeline(transaction=False)
            for key, add in requests:
                current_key = f"{_PREFIX}:{key}:{window}"
                if add:
                    pipe.incrby(current_key, add)
                    pipe.expire(current_key, 2 * WINDOW_S)
                else:
                    pipe.get(current_key)
                pipe.get(f"{_PREFIX}:{key}:{window - 1}")
            replies = iter(pipe.execute())
            counts = []
            for _, add in requests:
                current = next(replies)
                if add:
                    next(replies)  # the EXPIRE's answer
                counts.append((int(current or 0), int(next(replies) or 0)))
            return counts
        except Exception as error:  # a rate limiter must not take the API down with Redis
            log.warning("rate limit falls back to this process: Redis did not answer (%s)", error)
    return [_local(key, window, add) for key, add in requests]


def _estimate(key: str, add: int) -> tuple[float, float]:
    """The requests of the last minute for `key` (sliding estimate) and seconds left in this window."""
    return _estimate_many([(key, add)])[0]


def _estimate_many(requests: list[tuple[str, int]]) -> list[tuple[float, float]]:
    now = time.time()
    window = int(now // WINDOW_S)
    elapsed = now - window * WINDOW_S
    return [
        (current + previous * (1.0 - elapsed / WINDOW_S), WINDOW_S - elapsed)
        for current, previous in _counts_many(requests, window)
    ]


def _refuse(what: str, per_minute: int, wait_s: float) -> RateLimited:
    wait = max(1, math.ceil(wait_s))
    return RateLimited(f"more than {per_minute} {what} a minute; retry in {wait} s", headers={"Retry-After": str(wait)})


def check_rate(tenant_id: str) -> None:
    """Count one request of the tenant; 429 when it is over MODELPRESS_RATE_LIMIT_PER_MINUTE."""
    per_minute = get_settings().rate_limit_per_minute
    if per_minute <= 0:
        return
    used, wait_s = _estimate(f"tenant:{tenant_id}", 1)
    if used > per_minute:
        raise _refuse("requests", per_minute, wait_s)


def check_bad_key_budget(address: str) -> None:
    """Before a key is looked up: 429 when this address already spent its bad-key budget."""
    per_minute = get_settings().rate_limit_invalid_keys_per_minute
    if per_minute <= 0:
        return
    used, wait_s = _estimate(f"badkey:{address}", 0)
    if used >= per_minute:
        raise _refuse("requests with a missing or unknown API key", per_minute, wait_s)


def record_bad_key(address: str) -> None:
    if get_settings().rate_limit_invalid_keys_per_minute > 0:
        _estimate(f"badkey:{address}", 1)


def check_known_key_request(address: str, tenant_id: str) -> None:
    """Both checks of a request whose key is already known to be valid (verified a moment ago), in one round
    trip: the address's bad-key budget, then the tenant's rate. Unknown keys go through check_bad_key_budget
    before their lookup instead, so guesses stay bounded."""
    settings = get_settings()
    budget, per_minute = settings.rate_limit_invalid_keys_per_minute, settings.rate_limit_per_minute
    requests = ([(f"badkey:{address}", 0)] if budget > 0 else []) + (
        [(f"tenant:{tenant_id}", 1)] if per_minute > 0 else []
    )
    if not requests:
        return
    estimates = _estimate_many(requests)
    if budget > 0:
        used, wait_s = estimates.pop(0)
        if used >= budget:
            raise _refuse("requests with a missing or unknown API key", budget, wait_s)
    if per_minute > 0:
        used, wait_s = estimates[0]
        if used > per_minute:
            raise _refuse("requests", per_minute, wait_s)
