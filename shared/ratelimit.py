"""Per-token rate limits: a token bucket per (token subject, reads|writes), in process. Pure: the caller
passes the time (a monotonic clock in the HTTP layer, a fake one in the tests).

A bucket holds up to ``burst`` tokens and gains ``per_s`` a second; a request takes one or is told how
long to wait for it. ``per_s`` 0 switches the limit off.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rate:
    per_s: float
    burst: float

    @property
    def enabled(self) -> bool:
        return self.per_s > 0


@dataclass(frozen=True, slots=True)
class Bucket:
    tokens: float
    at: float


def take(bucket: Bucket | None, rate: Rate, now: float, cost: float = 1.0) -> tuple[Bucket, float]:
    """The bucket after asking for ``cost`` tokens at ``now``, and the wait in seconds (0.0: granted).
    A new bucket starts full; a clock that went backwards adds nothing."""
    if bucket is None:
        tokens = rate.burst
    else:
        tokens = min(rate.burst, bucket.tokens + max(0.0, now - bucket.at) * rate.per_s)
    if tokens >= cost:
        return Bucket(tokens - cost, now), 0.0
    return Bucket(tokens, now), (cost - tokens) / rate.per_s


def retry_after(wait_s: float) -> int:
    """``Retry-After`` is whole seconds: rounded up, at least 1."""
    return max(1, math.ceil(wait_s))


class RateLimiter:
    """Buckets per (subject, kind), the least recently used forgotten past ``max_keys`` (a forgotten
    bucket comes back full: memory stays bounded whatever subjects appear)."""

    def __init__(self, reads: Rate, writes: Rate, max_keys: int = 100_000) -> None:
        self.reads, self.writes = reads, writes
        self.max_keys = max_keys
        self._buckets: OrderedDict[tuple[str, bool], Bucket] = OrderedDict()

    def check(self, subject: str, *, write: bool, now: float) -> float:
        """0.0 when the request may go ahead (and is counted), else the seconds until it could."""
        rate = self.writes if write else self.reads
        if not rate.enabled:
            return 0.0
        key = (subject, write)
        bucket, wait = take(self._buckets.get(key), rate, now)
        self._buckets[key] = bucket
        self._buckets.move_to_end(key)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait
