"""Open Server-Sent Event streams per token subject (``/v1/events/stream`` and ``/dashboard/stream`` together),
and when a stream's token runs out.

Each open stream holds a consumer (or a read-model waiter) and a connection: without a cap one token could
open thousands. The cap is per subject, so new tokens of the same person buy no new streams, and per process
(as the rate limits). Over it: 429 with ``Retry-After``. A stream ends when its token expires, not only when
it is revoked (a reconnect then gets 401).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from fastapi import Request

from shared.auth import Principal
from shared.domain.errors import RateLimited

RETRY_AFTER_S = 5


class StreamSlots:
    """Open streams per subject; ``hold`` takes one for the life of a stream (pure bookkeeping)."""

    def __init__(self, per_subject: int) -> None:
        self.per_subject = per_subject
        self.open: Counter[str] = Counter()

    def take(self, subject: str) -> None:
        if self.open[subject] >= self.per_subject:
            raise RateLimited(f"{subject} already has {self.open[subject]} open event streams, the most one token "
                              f"subject may hold (NEEDLE_SSE_MAX_PER_SUBJECT); close one first",
                              retry_after=RETRY_AFTER_S)
        self.open[subject] += 1

    def give(self, subject: str) -> None:
        self.open[subject] -= 1
        if self.open[subject] <= 0:
            del self.open[subject]

    @contextlib.contextmanager
    def holding(self, subject: str) -> Iterator[None]:
        self.take(subject)
        try:
            yield
        finally:
            self.give(subject)


def slots_of(request: Request, per_subject: int) -> StreamSlots:
    """The app's one StreamSlots (both stream routes share it)."""
    slots: StreamSlots | None = getattr(request.app.state, "stream_slots", None)
    if slots is None:
        slots = request.app.state.stream_slots = StreamSlots(per_subject)
    return slots


def seconds_left(p: Principal, now: float) -> float:
    """How long ``p``'s token is still good (0 once it has expired)."""
    return max(0.0, p.expires_at - now)
