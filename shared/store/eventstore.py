"""The event store: JetStream NEEDLE_EVENTS, one subject per issue and event type.

* ``load``: every event of one issue, oldest first, through batch direct gets answered from the
  per-subject index (the last event of each of its subjects, then each subject's events; no consumer).
* ``append``: optimistic concurrency with ``Nats-Expected-Last-Subject-Sequence`` scoped to
  ``needle.events.issue.<id>.*`` (0 = new issue); several events go in one atomic batch, so a
  dispatch is never half-written. ``Nats-Msg-Id`` catches replays inside the duplicate window.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from shared import tracing
from shared.domain.errors import ConcurrencyConflict, Unavailable
from shared.events import subjects as sj
from shared.events.codec import Envelope, decode, encode
from shared.events.models import Event

from . import natsfast
from .inbox import ReplyMux

if TYPE_CHECKING:
    from shared.privacy.issuekeys import IssueKeys

natsfast.install()

WRONG_LAST_SEQUENCE = 10071
DUPLICATE_BATCH = 10201  # an atomic batch whose msg id JetStream has already stored
BATCH_MAX = 1000


@dataclass(frozen=True, slots=True)
class Appended:
    """Where the last event of an append landed; ``duplicate`` when JetStream had seen its msg id."""

    seq: int
    envelopes: tuple[Envelope, ...]
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """Events for one issue, guarded by the issue's last subject sequence (0 = new issue)."""

    issue_id: str
    events: tuple[Event, ...]
    expected_last_seq: int
    version: int
    actor: str | None = None
    msg_id: str | None = None
    causation: str | None = None
    correlation: str | None = None  # trace id; None: the current request's (shared/tracing.py)

    def occ_headers(self) -> dict[str, str]:
        family = sj.family_of(self.events[0].name) if self.events else "issue"
        h = {"Nats-Expected-Last-Subject-Sequence": str(self.expected_last_seq),
             "Nats-Expected-Last-Subject-Sequence-Subject": sj.issue_events(self.issue_id, family)}
        if self.msg_id:
            h["Nats-Msg-Id"] = self.msg_id
        return h

    def envelopes(self, now: datetime, source: str) -> list[Envelope]:
        return make_envelopes(self.issue_id, list(self.events), version=self.version, now=now, actor=self.actor,
                              causation=self.causation, source=source,
                              correlation=self.correlation or tracing.current.get())


def _stored(env: Envelope, seq: int) -> Envelope:
    return Envelope(id=env.id, source=env.source, subject=env.subject, time=env.time, data=env.data,
                    actor=env.actor, causationid=env.causationid, seq=seq, correlationid=env.correlationid,
                    sealed=env.sealed)


class EventStore(Protocol):
    texts: IssueKeys | None  # the issues' data keys (free text sealed in the stream), if this store seals

    async def load(self, issue_id: str) -> list[Envelope]: ...

    async def is_current(self, issue_id: str, last_seq: int) -> bool: ...

    async def load_one(self, subject: str) -> Envelope | None: ...

    async def append(self, issue_id: str, events: list[Event], *, expected_last_seq: int, version: int,
                     now: datetime, actor: str | None = None, msg_id: str | None = None,
                     causation: str | None = None, source: str = "needle",
                     correlation: str | None = None) -> Appended: ...


def make_envelopes(issue_id: str, events: list[Event], *, version: int, now: datetime, actor: str | None,
                   causation: str | None, source: str, correlation: str | None = None) -> list[Envelope]:
    """CloudEvent ids are ``<issue>.<n>``: the n-th event of the issue, unique because of OCC."""
    return [
        Envelope(id=f"{issue_id}.{version + i + 1}", source=source, subject=issue_id, time=now, data=e,
                 actor=actor, causationid=causation, correlationid=correlation)
        for i, e in enumerate(events)
    ]


class JetStreamEventStore:
    """``texts``: the issues' data keys. With them, free text is sealed as it is appended and opened as it is
    loaded (shared/privacy/issuekeys.py); callers see clear events either way. Without them (tools that only
    count), events are stored and read as they come."""

    def __init__(self, nc: NATS, *, timeout: float = 5.0, texts: IssueKeys | None = None) -> None:
        self._nc = nc
        self.texts = texts
        self._timeout = timeout
        self._mux = ReplyMux(nc)
        self._batch_ids = itertools.count()
        self._batch_prefix = uuid.uuid4().hex[:12]

    async def start(self) -> None:
        await self._mux.start()

    # -- reading -------------------------------------------------------------------------------
    async def load(self, issue_id: str, after_seq: int = 0) -> list[Envelope]:
        """The issue's events after ``after_seq``, oldest first, as one replica knows them.

        Not one ``next_by_subj`` over ``needle.events.issue.<id>.*``: for a wildcard nats-server 2.15
        scans the stream linearly from the start sequence once it holds 64k subjects (measured: 46
        loads/s at 400,000 events), and every issue event has a subject of its own. Instead: the last
        event of each of the issue's subjects (``multi_last``, answered from the per-subject index), then
        each subject's events by its literal subject (an index lookup), in flight together: 1 + k round
        trips for k event types, whatever the stream's size (~4,500 + ~5,800 per second on one core)."""
        lasts = await self._direct_batch({"multi_last": [sj.issue_events(issue_id)], "batch": BATCH_MAX})
        if not lasts:
            return []
        # the view of the replica that answered: every subject of the issue with an event up to its
        # horizon is listed, so the events up to the horizon are the listed subjects' -- a consistent prefix
        horizon = max(seq for seq, _, _ in lasts)
        wanted = [(subject, seq) for seq, subject, _ in lasts if seq > after_seq]
        parts = await asyncio.gather(*(self._subject_events(subject, after_seq + 1, last)
                                       for subject, last in wanted))
        merged = {seq: data for part in parts for seq, _, data in part if seq <= horizon}
        envs = [decode(merged[seq], seq=seq) for seq in sorted(merged)]
        return envs if self.texts is None else await self.texts.open(envs)

    async def _leader_last(self, subject: str) -> dict[str, Any] | None:
        """The last message on ``subject`` (a wildcard uses the per-subject index) as the stream leader has it,
        None when there is none."""
        req = orjson.dumps({"last_by_subj": subject})
        try:
            msg = await self._nc.request(f"$JS.API.STREAM.MSG.GET.{sj.EVENTS_STREAM}", req, timeout=self._timeout)
        except (NatsTimeout, TimeoutError, NoRespondersError) as exc:
            raise Unavailable("the event store's leader did not answer in time") from exc
        body = orjson.loads(msg.data)
        err = body.get("error")
        if isinstance(err, dict):
            if err.get("code") == 404:
                return None
            raise Unavailable(f"event store: {err.get('description')} ({err.get('err_code')})")
        message: dict[str, Any] = body["message"]
        return message

    async def load_one(self, subject: str) -> Envelope | None:
        """The last event on one literal subject (e.g. a visit's ``visit_recorded``), asked of the stream
        leader (a read right after the write that stored it must find it); None when there is none."""
        m = await self._leader_last(subject)
        if m is None:
            return None
        env = decode(base64.b64decode(m["data"]), seq=int(m["seq"]))
        return env if self.texts is None else await self.texts.open_one(env)

    async def _subject_events(self, subject: str, start: int, last: int, attempts: int = 5
                              ) -> list[tuple[int, str, bytes]]:
        """Every event of one literal subject from ``start``, up to ``last`` at least: on an R3 stream
        another replica than the one that listed ``last`` may answer, and be behind: asked again."""
        for attempt in range(attempts):
            got = await self._direct_batch({"seq": start, "next_by_subj": subject, "batch": BATCH_MAX},
                                           page_subject=subject)
            if got and got[-1][0] >= last:
                return got
            await asyncio.sleep(0.01 * (attempt + 1))
        raise Unavailable(f"the event store answered {subject} without its event at {last}; retry later")

    async def _direct_batch(self, request: dict[str, object], page_subject: str | None = None
                            ) -> list[tuple[int, str, bytes]]:
        """A batch direct get: (sequence, subject, data) in order; ``page_subject``: ask for the rest while
        the server says more is pending (``next_by_subj`` from the sequence after the last one received)."""
        out: list[tuple[int, str, bytes]] = []
        req = dict(request)
        if not self._mux.started:
            await self._mux.start()
        while True:
            reply, done, token = self._mux.open_batch()
            try:
                await self._nc.publish(f"$JS.API.DIRECT.GET.{sj.EVENTS_STREAM}", orjson.dumps(req), reply=reply)
                try:
                    msgs = await asyncio.wait_for(done, self._timeout)
                except TimeoutError as exc:
                    raise Unavailable("event store did not answer in time") from exc
            finally:
                self._mux.close(token)
            more = False
            for msg in msgs:
                hdrs = msg.headers or {}
                status = hdrs.get("Status")
                if status == "404":
                    return out
                if status == "204":  # end of batch
                    more = int(hdrs.get("Nats-Num-Pending", "0")) > 0
                    break
                if status:
                    raise Unavailable(f"direct get failed: {status} {hdrs.get('Description', '')}")
                out.append((int(hdrs["Nats-Sequence"]), hdrs.get("Nats-Subject", ""), msg.data))
            if not more or page_subject is None:
                return out
            req = {"seq": out[-1][0] + 1, "next_by_subj": page_subject, "batch": BATCH_MAX}

    async def is_current(self, issue_id: str, last_seq: int) -> bool:
        """Whether the issue has no event after ``last_seq``, asked of the stream leader. ``load`` reads
        through direct gets, which any replica of an R3 stream may answer, one that is behind included
        (a node just restarted): a refusal decided on such a history ("no such task") would be wrong.
        ``last_by_subj`` (the per-subject index), not ``next_by_subj`` (a linear scan for a wildcard)."""
        m = await self._leader_last(sj.issue_events(issue_id))
        return m is None or int(m["seq"]) <= last_seq  # no event at all: nothing after it either

    # -- writing -------------------------------------------------------------------------------
    async def append(self, issue_id: str, events: list[Event], *, expected_last_seq: int, version: int,
                     now: datetime, actor: str | None = None, msg_id: str | None = None,
                     causation: str | None = None, source: str = "needle",
                     correlation: str | None = None) -> Appended:
        if not events:
            raise ValueError("nothing to append")
        req = AppendRequest(issue_id, tuple(events), expected_last_seq, version, actor, msg_id, causation,
                            correlation)
        if len(events) == 1:
            env = req.envelopes(now, source)[0]
            stored = env if self.texts is None else (await self.texts.seal([env]))[0]
            ack = await self._request(sj.aggregate_event(issue_id, events[0].name), encode(stored), req.occ_headers())
            seq = int(str(ack["seq"]))
            return Appended(seq=seq, envelopes=(_stored(env, seq),), duplicate=bool(ack.get("duplicate")))
        return (await self.append_many([req], now=now, source=source))[0]

    async def append_many(self, requests: list[AppendRequest], *, now: datetime,
                          source: str = "needle") -> list[Appended]:
        """Append several issues' events in ONE atomic batch, each issue guarded by its own OCC header:
        all are stored or none (a ConcurrencyConflict on any issue rejects the whole batch). JetStream
        stages an R1 atomic batch on disk and commits it under the stream lock, so one batch of many
        issues costs about what one batch of one issue does."""
        envs: list[tuple[str, Envelope, dict[str, str]]] = []
        clear = [req.envelopes(now, source) for req in requests]
        for req, req_envs in zip(requests, clear, strict=True):
            sealed = req_envs if self.texts is None else await self.texts.seal(req_envs)
            for i, env in enumerate(sealed):
                envs.append((sj.aggregate_event(req.issue_id, env.data.name), env, req.occ_headers() if i == 0 else {}))
        if not envs or len(envs) > BATCH_MAX:
            raise ValueError(f"an atomic append holds 1..{BATCH_MAX} events, not {len(envs)}")
        batch_id = f"{self._batch_prefix}-{next(self._batch_ids)}"
        last = len(envs)
        ack: dict[str, object] = {}
        for i, (subject, env, hdrs) in enumerate(envs, 1):
            hdrs = {**hdrs, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
            if i == last:
                hdrs["Nats-Batch-Commit"] = "1"
                ack = await self._request(subject, encode(env), hdrs)
            else:
                await self._nc.publish(subject, encode(env), headers=hdrs)
        seq = int(str(ack["seq"])) - len(envs) + 1
        out: list[Appended] = []
        for req_envs in clear:
            stored = tuple(_stored(env, seq + i) for i, env in enumerate(req_envs))
            seq += len(stored)
            out.append(Appended(seq=stored[-1].seq, envelopes=stored, duplicate=bool(ack.get("duplicate"))))
        return out

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str]) -> dict[str, object]:
        try:
            msg = await self._mux.request(subject, payload, headers=headers, timeout=self._timeout)
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
