"""How far behind needle's consumers are, read from JetStream (and the projection checkpoint).

A consumer's lag is the number of messages it has still to handle and the age of the oldest of them
("seconds behind"). Everything is read from the server, so any process that can reach NATS (the HTTP
intake of ``needle up``) measures the router and the projections that run in other processes, with
no metrics plumbing between processes."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from nats.aio.client import Client as NATS

from shared.events import subjects as sj


@dataclass(frozen=True, slots=True)
class Lag:
    messages: int  # not yet handled
    seconds: float  # age of the oldest of them (0 when none)
    present: bool = True  # False: the consumer does not exist (yet)

    def as_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "seconds": round(self.seconds, 3), "present": self.present}


async def _api(nc: NATS, subject: str, body: dict[str, Any] | None = None, timeout: float = 2.0) -> dict[str, Any]:
    msg = await nc.request(subject, orjson.dumps(body) if body else b"", timeout=timeout)
    out: dict[str, Any] = orjson.loads(msg.data)
    return out


def _ts(value: str) -> float:
    """JetStream's RFC 3339 nanosecond timestamps, to epoch seconds."""
    head, _, frac = value.rstrip("Z").partition(".")
    base = datetime.fromisoformat(head + "+00:00").timestamp()
    return base + (float("0." + frac[:6]) if frac else 0.0)


async def message_time(nc: NATS, stream: str, seq: int, subject: str | None = None) -> tuple[int, float] | None:
    """(sequence, epoch seconds) of the message at ``seq`` (or the first at or after it on ``subject``)."""
    req: dict[str, Any] = {"seq": seq}
    if subject:
        req["next_by_subj"] = subject
    msg = await nc.request(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(req), timeout=2.0)
    hdrs = msg.headers or {}
    if hdrs.get("Status") or "Nats-Time-Stamp" not in hdrs:
        return None
    return int(hdrs["Nats-Sequence"]), _ts(hdrs["Nats-Time-Stamp"])


async def stream_state(nc: NATS, stream: str, subjects_filter: str | None = None) -> dict[str, Any] | None:
    resp = await _api(nc, f"$JS.API.STREAM.INFO.{stream}", {"subjects_filter": subjects_filter}
                      if subjects_filter else None)
    if "error" in resp:
        return None
    state: dict[str, Any] = resp["state"]
    return state


async def consumer_lag(nc: NATS, stream: str, durable: str, *, in_flight_counts: bool = True,
                       now: float | None = None) -> Lag:
    """Lag of a durable consumer: messages not yet delivered (plus delivered and not yet acked when
    ``in_flight_counts``), and the age of the first message after its ack floor that it would take."""
    info = await _api(nc, f"$JS.API.CONSUMER.INFO.{stream}.{durable}")
    if "error" in info:
        return Lag(0, 0.0, present=False)
    behind = int(info.get("num_pending", 0)) + (int(info.get("num_ack_pending", 0)) if in_flight_counts else 0)
    if behind == 0:
        return Lag(0, 0.0)
    cfg = info.get("config", {})
    floor = int(info.get("ack_floor", {}).get("stream_seq", 0))
    if not in_flight_counts:
        floor = max(floor, int(info.get("delivered", {}).get("stream_seq", 0)))
    filters = cfg.get("filter_subjects") or ([cfg["filter_subject"]] if cfg.get("filter_subject") else [None])
    oldest: float | None = None
    for f in filters:
        got = await message_time(nc, stream, floor + 1, f)
        if got is not None and (oldest is None or got[1] < oldest):
            oldest = got[1]
    now = time.time() if now is None else now
    return Lag(behind, max(0.0, now - oldest) if oldest is not None else 0.0)


async def checkpoint_lag(nc: NATS, checkpoint: int, *, now: float | None = None) -> Lag:
    """Lag of a reader whose position is a checkpoint on NEEDLE_EVENTS (the projections)."""
    state = await stream_state(nc, sj.EVENTS_STREAM)
    if state is None:
        return Lag(0, 0.0, present=False)
    last = int(state.get("last_seq", 0))
    behind = max(0, last - checkpoint)
    if behind == 0:
        return Lag(0, 0.0)
    got = await message_time(nc, sj.EVENTS_STREAM, checkpoint + 1)
    now = time.time() if now is None else now
    return Lag(behind, max(0.0, now - got[1]) if got is not None else 0.0)


async def timers_pending(nc: NATS) -> int:
    """SLA timers waiting to fire: one schedule message per dispatch (the server removes it when it fires)."""
    state = await stream_state(nc, sj.TIMERS_STREAM, sj.TIMER_SCHEDULES)
    if state is None:
        return 0
    return len(state.get("subjects") or {})
