"""Per-tenant rate limit: a token bucket per API process (429 with Retry-After)."""
from __future__ import annotations

import math
import threading
import time

from app.config import get_settings
from app.errors import RateLimited

_lock = threading.Lock()
_buckets: dict[str, tuple[float, float]] = {}


def check_rate(tenant_id: str) -> None:
    per_minute = get_settings().rate_limit_per_minute
    if per_minute <= 0:
        return
    rate = per_minute / 60.0
    now = time.monotonic()
    with _lock:
        tokens, last = _buckets.get(tenant_id, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * rate)
        if tokens < 1.0:
            _buckets[tenant_id] = (tokens, now)
            wait = math.ceil((1.0 - tokens) / rate)
            raise RateLimited(f"more than {per_minute} requests a minute; retry in {wait} s",
                              headers={"Retry-After": str(wait)})
        _buckets[tenant_id] = (tokens - 1.0, now)
