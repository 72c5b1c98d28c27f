"""CloudEvents 1.0 JSON codec for needle's events.

An envelope is what travels on NATS and what integrators read::

    {"specversion": "1.0", "id": ..., "source": "needle/intake", "type": "needle.issue.reported.v1",
     "subject": "<issue id>", "time": ..., "datacontenttype": "application/json",
     "dataschema": "urn:needle:schema:needle.issue.reported.v1", "actor": ..., "data": {...}}

``actor``, ``causationid``, ``correlationid`` and ``sealed`` (an issue's free text, sealed with its data key:
shared/privacy/texts.py) are CloudEvents extension attributes.
Upcasters (old type -> current model) live here, in one place.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from .models import BY_CE_TYPE, Event

SPECVERSION = "1.0"

# old CloudEvents type -> function turning its data into the current model's data
UPCASTERS: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {}


@dataclass(frozen=True, slots=True)
class Envelope:
    """One recorded event: its CloudEvent attributes, its payload, and where it sits in the stream."""

    id: str
    source: str
    subject: str
    time: datetime
    data: Event
    actor: str | None = None
    causationid: str | None = None
    seq: int = 0  # stream sequence, 0 until stored
    correlationid: str | None = None  # the trace id of the request whose flow it belongs to (shared/tracing.py)
    sealed: str | None = None  # the free text, sealed with the data key (shared/privacy/texts.py)

    @property
    def type(self) -> str:
        return self.data.ce_type

    def to_cloudevent(self) -> dict[str, Any]:
        ce: dict[str, Any] = {
            "specversion": SPECVERSION,
            "id": self.id,
            "source": self.source,
            "type": self.data.ce_type,
            "subject": self.subject,
            "time": self.time.isoformat().replace("+00:00", "Z"),
            "datacontenttype": "application/json",
            "dataschema": f"urn:needle:schema:{self.data.ce_type}",
            "data": self.data.model_dump(mode="json"),
        }
        if self.actor:
            ce["actor"] = self.actor
        if self.causationid:
            ce["causationid"] = self.causationid
        if self.correlationid:
            ce["correlationid"] = self.correlationid
        if self.sealed:
            ce["sealed"] = self.sealed
        if self.seq:
            ce["sequence"] = self.seq
        return ce


def encode(env: Envelope) -> bytes:
    ce = env.to_cloudevent()
    ce.pop("sequence", None)  # the stream assigns it; never stored inside the payload
    return orjson.dumps(ce)


class UnknownEventType(ValueError):
    """An event of a type this version of needle does not know (written by a newer one)."""


def decode(raw: bytes, seq: int = 0) -> Envelope:
    ce = orjson.loads(raw)
    ce_type = ce["type"]
    data = ce.get("data") or {}
    if ce_type in UPCASTERS:
        ce_type, up = UPCASTERS[ce_type]
        data = up(data)
    model = BY_CE_TYPE.get(ce_type)
    if model is None:
        raise UnknownEventType(ce_type)
    return Envelope(
        id=ce["id"],
        source=ce["source"],
        subject=ce["subject"],
        time=datetime.fromisoformat(ce["time"]),
        data=model.model_validate(data),
        actor=ce.get("actor"),
        causationid=ce.get("causationid"),
        seq=seq,
        correlationid=ce.get("correlationid"),
        sealed=ce.get("sealed"),
    )
