"""What the stream holds, read back independently of needle's own code paths (batch direct get
over every subject, from sequence 1), and the checks of the fault suite against it."""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from nats.aio.client import Client as NATS

from shared.events import subjects as sj

from .load import GRID, Ledger

ISSUE_PREFIX = f"{sj.EVENTS_ROOT}.issue."


@dataclass
class StreamTally:
    """Counts of every issue event in NEEDLE_EVENTS, kept up to date incrementally."""

    nc: NATS
    next_seq: int = 1
    by_type: Counter[str] = field(default_factory=Counter)
    reported: Counter[str] = field(default_factory=Counter)  # issue id -> issue_reported events
    routed: Counter[str] = field(default_factory=Counter)  # issue id -> issue_routed events
    escalated: set[str] = field(default_factory=set)
    dispatched: Counter[str] = field(default_factory=Counter)  # task id -> task_dispatched events
    acknowledged: Counter[str] = field(default_factory=Counter)  # task id -> task_acknowledged events
    cloud_ids: Counter[str] = field(default_factory=Counter)
    issue_events: int = 0
    last_issue_seq: int = 0  # the projection worker's checkpoint follows issue events only

    async def last_seq(self) -> int:
        info = await self.nc.jetstream().stream_info(sj.EVENTS_STREAM)
        return int(info.state.last_seq)

    async def catch_up(self, timeout: float = 60.0) -> int:
        """Read every message up to the stream's last sequence now (a replica that answers a direct get
        may lag a little: read again until the leader's last sequence is reached)."""
        target = await self.last_seq()
        deadline = time.monotonic() + timeout
        while self.next_seq <= target:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read the stream up to {target} (at {self.next_seq})")
            if not await self._read_batch():
                await asyncio.sleep(0.1)
        return target

    async def _read_batch(self) -> int:
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        got = 0
        try:
            req = orjson.dumps({"seq": self.next_seq, "next_by_subj": sj.ALL_EVENTS, "batch": 1000})
            await self.nc.publish(f"$JS.API.DIRECT.GET.{sj.EVENTS_STREAM}", req, reply=inbox)
            while True:
                msg = await sub.next_msg(timeout=5)
                hdrs = msg.headers or {}
                if hdrs.get("Status"):  # 204 end of batch, 404 nothing (more) on this replica
                    return got
                seq = int(hdrs["Nats-Sequence"])
                if self._count(hdrs["Nats-Subject"], msg.data):
                    self.last_issue_seq = seq
                self.next_seq = seq + 1
                got += 1
        finally:
            await sub.unsubscribe()

    def _count(self, subject: str, data: bytes) -> bool:
        if not subject.startswith(ISSUE_PREFIX):
            return False
        issue_id, etype = subject[len(ISSUE_PREFIX):].split(".", 1)
        event = orjson.loads(data)
        self.issue_events += 1
        self.by_type[etype] += 1
        self.cloud_ids[event["id"]] += 1
        d = event["data"]
        if etype == "issue_reported":
            self.reported[issue_id] += 1
        elif etype == "issue_routed":
            self.routed[issue_id] += 1
        elif etype == "issue_escalated":
            self.escalated.add(issue_id)
        elif etype == "task_dispatched":
            self.dispatched[d["task_id"]] += 1
        elif etype == "task_acknowledged":
            self.acknowledged[d["task_id"]] += 1
        return True


@dataclass
class Check:
    """The outcome of one verification: the figures of the table and every problem found."""

    acked: int = 0
    found: int = 0
    lost: int = 0
    duplicates: int = 0
    problems: list[str] = field(default_factory=list)
    projection: dict[str, tuple[int, int]] = field(default_factory=dict)  # what: (read model, stream)


def check_stream(t: StreamTally, ledger: Ledger, reports: list[str], acks: list[str]) -> Check:
    """``reports`` / ``acks``: the issue ids / task ids acknowledged to the client in this phase."""
    c = Check(acked=len(reports) + len(acks))
    for issue_id in reports:
        n = t.reported[issue_id]
        c.found += n == 1
        c.lost += n == 0
    for task_id in acks:
        n = t.acknowledged[task_id]
        c.found += n == 1
        c.lost += n == 0
    # duplicates anywhere in the stream, not only among this phase's writes
    dup_reports = sum(1 for n in t.reported.values() if n > 1)
    dup_routes = sum(1 for i, n in t.routed.items() if n > 1 and i not in t.escalated)
    dup_tasks = sum(1 for n in t.dispatched.values() if n > 1)
    dup_acks = sum(1 for n in t.acknowledged.values() if n > 1)
    dup_ids = sum(1 for n in t.cloud_ids.values() if n > 1)
    c.duplicates = dup_reports + dup_routes + dup_tasks + dup_acks + dup_ids
    if c.duplicates:
        c.problems.append(f"duplicates: reports {dup_reports}, routings {dup_routes}, dispatches {dup_tasks}, "
                          f"acknowledgements {dup_acks}, CloudEvent ids {dup_ids}")
    if c.lost:
        c.problems.append(f"{c.lost} acknowledged writes are not in the stream")
    unrouted = [i for i in t.reported if t.routed[i] == 0]
    if unrouted:
        c.problems.append(f"{len(unrouted)} issues never dispatched (e.g. {unrouted[:3]})")
    if ledger.mismatched_ids:
        c.problems.append(f"{ledger.mismatched_ids} retried keys came back with another issue id")
    return c


async def routed_all(t: StreamTally) -> bool:
    await t.catch_up()
    return all(t.routed[i] >= 1 for i in t.reported)


async def projection_counts(database_url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url)
    try:
        checkpoint = await conn.fetchval("SELECT seq FROM checkpoints WHERE projection = 'read_models'")
        audit = {r["type"]: r["n"] for r in await conn.fetch("SELECT type, count(*) AS n FROM audit GROUP BY type")}
        return {
            "checkpoint": int(checkpoint or 0),
            "issues": await conn.fetchval("SELECT count(*) FROM issues"),
            "tasks": await conn.fetchval("SELECT count(*) FROM tasks"),
            "acknowledged tasks": await conn.fetchval("SELECT count(*) FROM tasks WHERE acknowledged_at IS NOT NULL"),
            "stats: reported": await conn.fetchval(
                "SELECT coalesce(sum(n), 0) FROM stats_daily WHERE scope = 'area' AND key = $1 AND metric = 'reported'",
                GRID),
            "audit rows": sum(audit.values()),
            "audit": audit,
        }
    finally:
        await conn.close()


def check_projections(c: Check, t: StreamTally, counts: dict[str, Any]) -> None:
    recount = {
        "issues": len(t.reported), "tasks": len(t.dispatched), "acknowledged tasks": len(t.acknowledged),
        "stats: reported": sum(t.reported.values()), "audit rows": t.issue_events,
    }
    for what, n in recount.items():
        c.projection[what] = (int(counts[what]), n)
        if int(counts[what]) != n:
            c.problems.append(f"read model {what}: {counts[what]} != {n} recounted from the stream")
    for etype, n in t.by_type.items():
        got = int(counts["audit"].get(etype, 0))
        if got != n:
            c.problems.append(f"audit rows of {etype}: {got} != {n} in the stream")


async def quiesce(t: StreamTally, database_url: str, timeout: float = 150.0) -> dict[str, Any]:
    """Wait until every reported issue is routed and the projection checkpoint is the stream's last
    sequence (nothing left to do), then return the read models' counts."""
    deadline = time.monotonic() + timeout
    counts: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = await t.catch_up()
        if all(t.routed[i] >= 1 for i in t.reported):
            try:
                counts = await projection_counts(database_url)
            except (OSError, asyncpg.PostgresError):
                counts = {}
            if counts and counts["checkpoint"] >= t.last_issue_seq and await t.last_seq() == last:
                return counts
        await asyncio.sleep(0.5)
    raise AssertionError(f"not quiet after {timeout:.0f} s: projection checkpoint {counts.get('checkpoint')}, "
                         f"last issue event {t.last_issue_seq}, stream at {await t.last_seq()}, unrouted "
                         f"{sum(1 for i in t.reported if t.routed[i] == 0)}")
