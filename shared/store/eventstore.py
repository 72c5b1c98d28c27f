"""The event store: JetStream NEEDLE_EVENTS, one subject per issue and event type.

* ``load``: every event of one issue, oldest first, through batch direct get (one round trip
  for a normal issue, no consumer created).
* ``append``: optimistic concurrency with ``Nats-Expected-Last-Subject-Sequence`` scoped to
  ``needle.events.issue.<id>.*`` (0 = new issue); several events go in one atomic batch, so a
  dispatch is never half-written. ``Nats-Msg-Id`` catches replays inside the duplicate window.
"""
from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import orjson
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from shared.domain.errors import ConcurrencyConflict, Unavailable
from shared.events import subjects as sj
from shared.events.codec import Envelope, decode, encode
from shared.events.models import Event

from .inbox import ReplyMux

WRONG_LAST_SEQUENCE = 10071
DUPLICATE_BATCH = 10201  # an atomic batch whose msg id JetStream has already stored
BATCH_MAX = 1000


@dataclass(frozen=True, slots=True)
class Appended:
    """Where the last event of an append landed; ``duplicate`` when JetStream had seen its msg id."""

    seq: int
    envelopes: tuple[Envelope, ...]
    duplicate: bool = False


class EventStore(Protocol):
    async def load(self, issue_id: str) -> list[Envelope]: ...

    async def append(self, issue_id: str, events: list[Event], *, expected_last_seq: int, version: int,
                     now: datetime, actor: str | None = None, msg_id: str | None = None,
                     causation: str | None = None, source: str = "needle") -> Appended: ...


def make_envelopes(issue_id: str, events: list[Event], *, version: int, now: datetime, actor: str | None,
                   causation: str | None, source: str) -> list[Envelope]:
    """CloudEvent ids are ``<issue>.<n>``: the n-th event of the issue, unique because of OCC."""
    return [
        Envelope(id=f"{issue_id}.{version + i + 1}", source=source, subject=issue_id, time=now, data=e,
                 actor=actor, causationid=causation)
        for i, e in enumerate(events)
    ]


class JetStreamEventStore:
    def __init__(self, nc: NATS, *, timeout: float = 5.0) -> None:
        self._nc = nc
        self._timeout = timeout
        self._mux = ReplyMux(nc)
        self._batch_ids = itertools.count()
        self._batch_prefix = uuid.uuid4().hex[:12]

    async def start(self) -> None:
        await self._mux.start()

    # -- reading -------------------------------------------------------------------------------
    async def load(self, issue_id: str, after_seq: int = 0) -> list[Envelope]:
        out: list[Envelope] = []
        seq = after_seq + 1
        while True:
            reply, q, token = self._mux.open()
            try:
                req = orjson.dumps({"seq": seq, "next_by_subj": sj.issue_events(issue_id), "batch": BATCH_MAX})
                await self._nc.publish(f"$JS.API.DIRECT.GET.{sj.EVENTS_STREAM}", req, reply=reply)
                more = False
                while True:
                    try:
                        msg = await asyncio.wait_for(q.get(), self._timeout)
                    except TimeoutError as exc:
                        raise Unavailable("event store did not answer in time") from exc
                    hdrs = msg.headers or {}
                    status = hdrs.get("Status")
                    if status == "404":
                        return out
                    if status == "204":  # end of batch
                        more = int(hdrs.get("Nats-Num-Pending", "0")) > 0
                        break
                    if status:
                        raise Unavailable(f"direct get failed: {status} {hdrs.get('Description', '')}")
                    s = int(hdrs["Nats-Sequence"])
                    out.append(decode(msg.data, seq=s))
                    seq = s + 1
            finally:
                self._mux.close(token)
            if not more:
                return out

    # -- writing -------------------------------------------------------------------------------
    async def append(self, issue_id: str, events: list[Event], *, expected_last_seq: int, version: int,
                     now: datetime, actor: str | None = None, msg_id: str | None = None,
                     causation: str | None = None, source: str = "needle") -> Appended:
        if not events:
            raise ValueError("nothing to append")
        envs = make_envelopes(issue_id, events, version=version, now=now, actor=actor, causation=causation,
                              source=source)
        occ = {
            "Nats-Expected-Last-Subject-Sequence": str(expected_last_seq),
            "Nats-Expected-Last-Subject-Sequence-Subject": sj.issue_events(issue_id),
        }
        if msg_id:
            occ["Nats-Msg-Id"] = msg_id
        if len(envs) == 1:
            ack = await self._request(sj.issue_event(issue_id, events[0].name), encode(envs[0]), occ)
        else:
            batch_id = f"{self._batch_prefix}-{next(self._batch_ids)}"
            last = len(envs)
            for i, env in enumerate(envs, 1):
                hdrs = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
                if i == 1:
                    hdrs.update(occ)
                subject = sj.issue_event(issue_id, env.data.name)
                if i == last:
                    hdrs["Nats-Batch-Commit"] = "1"
                    ack = await self._request(subject, encode(env), hdrs)
                else:
                    await self._nc.publish(subject, encode(env), headers=hdrs)
        seq = int(str(ack["seq"]))
        first = seq - len(envs) + 1
        stored = tuple(Envelope(id=e.id, source=e.source, subject=e.subject, time=e.time, data=e.data,
                                actor=e.actor, causationid=e.causationid, seq=first + i) for i, e in enumerate(envs))
        return Appended(seq=seq, envelopes=stored, duplicate=bool(ack.get("duplicate")))

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str]) -> dict[str, object]:
        try:
            msg = await self._nc.request(subject, payload, headers=headers, timeout=self._timeout)
        except (NatsTimeout, TimeoutError) as exc:
            raise Unavailable("JetStream did not acknowledge the write in time") from exc
        except NoRespondersError as exc:
            raise Unavailable("JetStream is not available") from exc
        ack: dict[str, object] = orjson.loads(msg.data)
        err = ack.get("error")
        if isinstance(err, dict):
            if err.get("err_code") in (WRONG_LAST_SEQUENCE, DUPLICATE_BATCH):
                raise ConcurrencyConflict("the issue changed while this request was decided; reload and retry")
            raise Unavailable(f"JetStream refused the write: {err.get('description')} ({err.get('err_code')})")
        return ack
