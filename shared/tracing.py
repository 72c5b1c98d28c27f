"""Trace ids: one per request, carried into the events it causes and into every log line about them.

The HTTP edge takes the trace id of a W3C ``traceparent`` header, else an ``X-Request-Id``, else makes
one; it is bound here (a context variable) and in structlog's context for the request's duration. The
event store stamps it on the events it appends as the CloudEvents ``correlationid`` extension, and the
router and projections bind it again when they handle those events, so one grep finds the whole flow.
Pure functions plus one context variable; no IO."""
from __future__ import annotations

import random
import re
from contextvars import ContextVar

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_W3C_TRACE = re.compile(r"[0-9a-f]{32}")
_ZERO_TRACE = "0" * 32

current: ContextVar[str | None] = ContextVar("needle_trace_id", default=None)


def new_trace_id() -> str:
    """32 hex digits, never all zero. Random but not secret (as OpenTelemetry's ``RandomIdGenerator``):
    ``random``, not ``secrets``, which would cost a system call per request."""
    return f"{random.getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


def from_traceparent(value: str | None) -> str | None:
    """The trace id of a valid W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``), else None."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None or m.group(1) == _ZERO_TRACE or m.group(2) == "0" * 16:
        return None
    return m.group(1)


def from_request_id(value: str | None) -> str | None:
    """An ``X-Request-Id`` usable as a trace id (1-128 characters of a safe set), else None."""
    if not value:
        return None
    value = value.strip()
    return value if _REQUEST_ID.match(value) else None


def choose(traceparent: str | None, request_id: str | None) -> str:
    """The request's trace id: from ``traceparent``, else ``X-Request-Id``, else a new one."""
    return from_traceparent(traceparent) or from_request_id(request_id) or new_trace_id()


def traceparent_for(trace_id: str) -> str | None:
    """A ``traceparent`` continuing ``trace_id`` (only when it is a W3C trace id: 32 hex digits)."""
    if _W3C_TRACE.fullmatch(trace_id) and trace_id != _ZERO_TRACE:
        return f"00-{trace_id}-{new_span_id()}-01"
    return None
