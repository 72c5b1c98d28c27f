"""One small error tree for the domain. Each error says whether retrying can help.

The HTTP layer maps them to status codes in one place (services/intake/problems.py);
consumers map ``retryable`` to nak and the rest to term.
"""
from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every error the core raises on purpose."""

    retryable: bool = False
    status: int = 400
    title: str = "Bad request"

    def __init__(self, detail: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.extra = extra


class Invalid(DomainError):
    """The input can never be accepted as it is (unknown grid, bad duration, ...)."""

    status = 422
    title = "Unprocessable input"


class NotFound(DomainError):
    status = 404
    title = "Not found"


class NotAllowed(DomainError):
    """The actor may not do this (outside its scope or role)."""

    status = 403
    title = "Forbidden"


class Conflict(DomainError):
    """The command conflicts with the current state (acknowledging a closed task)."""

    status = 409
    title = "Conflict"


class ConcurrencyConflict(Conflict):
    """Someone else appended first; reloading and deciding again may succeed."""

    retryable = True
    title = "Concurrent update"


class PreconditionFailed(DomainError):
    """If-Match named a version that is no longer current."""

    status = 412
    title = "Precondition failed"


class Gone(DomainError):
    """What the request names existed and is no more (a one-time link used, or expired)."""

    status = 410
    title = "Gone"


class TooLarge(DomainError):
    """The body is larger than its limit; nothing was stored."""

    status = 413
    title = "Payload too large"


class UnsupportedMediaType(DomainError):
    """The body's type (from its content) is not one needle accepts, or not the one declared."""

    status = 415
    title = "Unsupported media type"


class Unavailable(DomainError):
    """A backing service is down or slow; retrying later helps."""

    retryable = True
    status = 503
    title = "Service unavailable"


class RateLimited(DomainError):
    """Too many requests for one token; ``retry_after`` (whole seconds) says when to come back."""

    retryable = True
    status = 429
    title = "Too many requests"
