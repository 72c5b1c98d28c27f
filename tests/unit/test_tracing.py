"""Trace ids at the HTTP edge (shared/tracing.py): pure, no server."""
from __future__ import annotations

from shared import tracing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def test_traceparent_gives_its_trace_id() -> None:
    assert tracing.choose(PARENT, "req-1") == TRACE
    assert tracing.choose(PARENT.upper(), None) == TRACE


def test_invalid_traceparent_falls_back_to_request_id_then_a_new_id() -> None:
    for bad in ("00-xyz-00f067aa0ba902b7-01", f"00-{'0' * 32}-00f067aa0ba902b7-01", f"00-{TRACE}-{'0' * 16}-01",
                f"00-{TRACE}-00f067aa0ba902b7", ""):
        assert tracing.choose(bad, "req-1") == "req-1"
    made = tracing.choose("garbage", "no spaces allowed")
    assert len(made) == 32 and int(made, 16) >= 0


def test_request_id_must_be_short_and_plain() -> None:
    assert tracing.from_request_id("a" * 128) == "a" * 128
    assert tracing.from_request_id("a" * 129) is None
    assert tracing.from_request_id("x\ny") is None


def test_traceparent_continues_only_w3c_trace_ids() -> None:
    tp = tracing.traceparent_for(TRACE)
    assert tp is not None and tracing.from_traceparent(tp) == TRACE
    assert tracing.traceparent_for("req-1") is None
