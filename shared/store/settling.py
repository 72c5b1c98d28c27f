"""Starting on a JetStream that is still settling: retry what a moment will fix, fail on the rest.

Every needle process creates (or finds) the streams and key-value buckets it needs when it starts. On a
fresh cluster, several processes starting at once meet JetStream while it elects the leaders of what one
of them has just created: a stream info request goes unanswered until its timeout, a bucket another process
created is not found yet, the meta leader answers "temporarily unavailable". Each of those clears within
seconds, so start-up retries them (with backoff, up to NEEDLE_START_TIMEOUT_S, each retry logged) instead of
dying and waiting for a supervisor or compose to restart the process. A refusal that no wait will change
(a bad stream configuration, a permission) fails at once.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from nats.errors import NoRespondersError
from nats.js.errors import NotFoundError, ServiceUnavailableError

T = TypeVar("T")
log = structlog.get_logger("needle.startup")

# JetStream error codes that describe a cluster still settling, not a request that is wrong
SETTLING_ERR_CODES = frozenset({
    10008,  # JetStream system temporarily unavailable (no meta leader yet)
    10005,  # no suitable peers for placement (the cluster's nodes have not all joined yet)
})


class JetStreamRefused(RuntimeError):
    """JetStream refused a start-up step needle words itself (a stream, the residents' key bucket);
    ``err_code`` is JetStream's error code, which ``retry_helps`` reads."""

    def __init__(self, message: str, err_code: int | None = None) -> None:
        super().__init__(message)
        self.err_code = err_code


def retry_helps(exc: BaseException) -> bool:
    """Whether waiting a moment and trying the start-up step again can succeed."""
    if isinstance(exc, (TimeoutError, NoRespondersError, ServiceUnavailableError, NotFoundError)):
        return True  # unanswered, no JetStream yet, or created by another process and not visible yet
    # JetStream's refusals, as nats-py raises them or as needle words them (JetStreamRefused)
    return getattr(exc, "err_code", None) in SETTLING_ERR_CODES


def backoff(attempt: int, first: float = 0.25, most: float = 2.0) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...): doubling from ``first`` up to ``most``."""
    return float(min(most, first * 2 ** (attempt - 1)))


async def settled(step: str, attempt: Callable[[], Awaitable[T]], *, within_s: float,
                  sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                  clock: Callable[[], float] = time.monotonic) -> T:
    """``attempt()``, retried while its error is one that ``retry_helps`` and ``within_s`` has not passed."""
    deadline = clock() + within_s
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt()
        except Exception as exc:
            wait = backoff(tries)
            if not retry_helps(exc) or clock() + wait > deadline:
                raise
            log.warning("JetStream not settled yet; retrying", step=step, attempt=tries,
                        error=repr(exc) if not str(exc) else f"{type(exc).__name__}: {exc}", retry_in_s=wait)
            await sleep(wait)
