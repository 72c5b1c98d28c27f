"""The read models against the stream they derive from, on real JetStream and real Postgres.

* Property: random valid histories (the pure decider ``shared/domain/issue.py`` driven by random commands, the
  router's pure ``react``/``on_timer`` answering like the router would) are appended into NEEDLE_EVENTS through
  ``JetStreamEventStore.append``; once the projection worker's checkpoint reaches the stream's last sequence,
  ``/v1/stats`` and ``queries.stats`` equal an independent recount over the raw events, and every issue row equals
  the aggregate folded from the same events.
* A rebuild during live traffic ends identical to the live tables, and the live API keeps answering meanwhile.
"""
from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.projections import queries
from services.projections.rebuild import rebuild
from services.projections.worker import ProjectionWorker
from services.router.reactions import RouterRules, next_edge, on_timer, react
from services.router.routing import plan_escalation
from shared.config import load_org, load_rulebook
from shared.domain import commands as cmd
from shared.domain.calendar import WorkCalendar
from shared.domain.clocks import SlaClocks
from shared.domain.errors import DomainError
from shared.domain.ids import new_issue_id
from shared.domain.issue import IssueState, decide, fold
from shared.domain.levels import Level
from shared.events import models as ev
from shared.events import subjects as sj
from shared.events.codec import Envelope
from shared.store.eventstore import JetStreamEventStore
from tests.support import NeedleHandle

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ORG_FILE, RULES_FILE = FIXTURES / "contract_org.yaml", FIXTURES / "contract_rules.yaml"
ORG = load_org(ORG_FILE)
RULES = RouterRules(org=ORG, rulebook=load_rulebook(RULES_FILE), clocks=SlaClocks(WorkCalendar("natural")))
BJ = ZoneInfo("Asia/Shanghai")  # the contract rulebook's timezone: day buckets are Beijing days
T0 = datetime(2025, 3, 4, 10, 0, tzinfo=BJ).astimezone(UTC)
SATISFACTION = ("satisfied", "basically_satisfied", "dissatisfied")
GRIDS = ("wuxing-g1", "wuxing-g2")
CATEGORIES = ("road_damage", "neighbour_dispute")
STEPS = (timedelta(0), timedelta(minutes=1), timedelta(minutes=20), timedelta(hours=3), timedelta(hours=20))
# Metrics left out of the comparisons because of a known bug (empty: every counter must equal the recount).
KNOWN_WRONG: frozenset[str] = frozenset()

_issue_numbers = itertools.count(1)
_example_numbers = itertools.count()


# -- random valid histories: the decider and the router's reactions, appended for real --------------------------
@dataclass
class IssueSim:
    id: str
    log: list[tuple[ev.Event, int]] = field(default_factory=list)
    pending_report: int = 0  # the report's seq while the router has not answered it yet

    @property
    def state(self) -> IssueState:
        return fold(self.id, self.log)


@dataclass
class Sim:
    """Drives issues through valid commands; each append goes through ``JetStreamEventStore.append`` and the
    router's reactions to it are appended right after (as the router would)."""

    store: JetStreamEventStore
    now: datetime
    # histories may escalate an issue whose lead already resolved (解决率 must still count it once)
    escalate_when_resolved: bool = True
    issues: list[IssueSim] = field(default_factory=list)
    envelopes: list[Envelope] = field(default_factory=list)

    async def append(self, sim: IssueSim, events: Sequence[ev.Event], actor: str, react_now: bool = True) -> None:
        s = sim.state
        out = await self.store.append(sim.id, list(events), expected_last_seq=s.last_seq, version=s.version,
                                      now=self.now, actor=actor)
        for env in out.envelopes:
            sim.log.append((env.data, env.seq))
            self.envelopes.append(env)
        if not react_now:
            return
        for env in out.envelopes:
            answer = react(sim.state, env.data, env.seq, RULES, self.now)
            if answer:
                await self.append(sim, answer, "router")

    async def report(self, rnd: int) -> IssueSim:
        issue_id = new_issue_id(int(self.now.timestamp() * 1000), next(_issue_numbers))
        sim = IssueSim(issue_id)
        self.issues.append(sim)
        risk = ("violence",) if rnd % 7 == 6 else ()
        urgency = ("normal", "urgent")[rnd // 7 % 2]
        command = cmd.ReportIssue(grid=GRIDS[rnd % 2], category=CATEGORIES[rnd // 2 % 2], title=f"issue {rnd}",
                                  reporter="gw", urgency=urgency, risk=risk)  # type: ignore[arg-type]
        routed_later = rnd % 5 == 4
        await self.append(sim, decide(sim.state, command, self.now), "gw", react_now=not routed_later)
        if routed_later:
            sim.pending_report = sim.log[-1][1]
        return sim

    def actions(self, sim: IssueSim) -> list[tuple[str, Any]]:
        s = sim.state
        if sim.pending_report:
            return [("route", None), ("on_site", None), ("urge", None)]
        if s.status == "closed":
            return [("feedback", x) for x in SATISFACTION]
        out: list[tuple[str, Any]] = []
        for t in s.open_tasks:
            if t.status == "dispatched":
                out.append(("ack", t.id))
            out += [("resolve", t.id), ("return", t.id), ("timer", t.id), ("extend", t.id)]
            if t.extension_requested is not None:
                out.append(("approve", t.id))
        if s.status == "resolved":
            out += [("verify", True), ("verify", False), *[("feedback", x) for x in SATISFACTION]]
        if s.level is not None and s.level != "city" and (self.escalate_when_resolved or s.status != "resolved"):
            out.append(("escalate", None))
        out.append(("urge", None))
        return out

    async def act(self, sim: IssueSim, action: tuple[str, Any]) -> None:
        kind, arg = action
        s = sim.state
        if kind == "route":
            report_seq, sim.pending_report = sim.pending_report, 0
            answer = react(s, sim.log[0][0], report_seq, RULES, self.now)
            if answer:
                await self.append(sim, answer, "router")
            return
        if kind == "timer":
            edge = next_edge(s.task(arg))
            if edge is not None:
                self.now = max(self.now, edge[0])
            answer = on_timer(s, arg, RULES, self.now)
            if answer:
                await self.append(sim, answer, "router")
            return
        command: cmd.Command
        match kind:
            case "on_site":
                sim.pending_report = 0
                command = cmd.ResolveOnSite(by="gw")
            case "ack":
                command = cmd.AcknowledgeTask(task_id=arg, by="h")
            case "resolve":
                command = cmd.ResolveTask(task_id=arg, by="h", note="fixed")
            case "return":
                command = cmd.ReturnTask(task_id=arg, by="h", reason="not ours")
            case "extend":
                command = cmd.RequestExtension(task_id=arg, by="h", extension=timedelta(hours=8), reason="rain")
            case "approve":
                due, warn = RULES.clocks.extend(RULES.rulebook, s.task(arg), s.task(arg).extension_requested
                                                or timedelta(hours=8))
                command = cmd.ApproveExtension(task_id=arg, by="sup", resolve_due=due, resolve_warn=warn)
            case "verify":
                command = cmd.VerifyIssue(passed=arg, by="gw", note=None if arg else "not fixed")
            case "feedback":
                command = cmd.RecordFeedback(satisfaction=arg, by="gw")
            case "escalate":
                assert s.level is not None
                plan = plan_escalation(ORG, RULES.rulebook, s.grid, s.category, Level(s.level))
                command = cmd.EscalateIssue(by="sup", reason="too slow", to_level=plan.level.value if plan else None)
            case _:
                command = cmd.UrgeIssue(by="sup", note="hurry")
        try:
            events = decide(s, command, self.now)
        except DomainError:  # e.g. escalating at the top of a branch: nothing is recorded
            return
        await self.append(sim, events, "actor")

    async def step(self, who: int, what: int, wait: int, max_issues: int) -> None:
        if not self.issues or (who % (len(self.issues) + 1) == len(self.issues) and len(self.issues) < max_issues):
            await self.report(what)
        else:
            sim = self.issues[who % len(self.issues)]
            choices = self.actions(sim)
            await self.act(sim, choices[what % len(choices)])
        self.now += STEPS[wait % len(STEPS)]


# -- the independent recount ------------------------------------------------------------------------------------
def _parents() -> dict[str, str | None]:
    doc = yaml.safe_load(ORG_FILE.read_text(encoding="utf-8"))
    return {a["id"]: a.get("parent") for a in doc["areas"]}


PARENTS = _parents()


def chain(grid: str) -> list[str]:
    out: list[str] = []
    at: str | None = grid
    while at is not None:
        out.append(at)
        at = PARENTS[at]
    return out


Key = tuple[str, str, date]  # (scope, id, Beijing day)


def recount(envelopes: Iterable[Envelope]) -> dict[Key, Counter[str]]:
    """What every counter must be, straight from the events (DOMAIN.md's rates; area counters count lead
    tasks, department counters all of theirs; 解决率 counts an issue once)."""
    out: dict[Key, Counter[str]] = defaultdict(Counter)
    issues: dict[str, dict[str, Any]] = {}
    tasks: dict[str, dict[str, Any]] = {}

    def dept(task: dict[str, Any], metric: str, at: datetime) -> None:
        out[("dept", task["department"], at.astimezone(BJ).date())][metric] += 1

    def leader(issue: dict[str, Any], metric: str, at: datetime) -> None:
        """The issue's areas and the department of its latest lead task (考核 charges the lead)."""
        area(issue, metric, at)
        if issue.get("lead"):
            out[("dept", issue["lead"], at.astimezone(BJ).date())][metric] += 1

    def area(issue: dict[str, Any], metric: str, at: datetime, n: int = 1) -> None:
        for a in issue["areas"]:
            out[("area", a, at.astimezone(BJ).date())][metric] += n

    def judge(issue: dict[str, Any], task: dict[str, Any], clock: str, at: datetime) -> None:
        """Fair rates: a clock is judged once, when met or breached, whichever comes first."""
        if clock in task["judged"]:
            return
        task["judged"].add(clock)
        metric = "tasks_ack_due" if clock == "acknowledge" else "tasks_resolve_due"
        dept(task, metric, at)
        if task["role"] == "lead":
            area(issue, metric, at)
            if clock == "resolve" and not issue["resolve_judged"]:  # the area's 解决率: an issue judged once
                issue["resolve_judged"] = True
                area(issue, "issues_resolve_due", at)

    for env in sorted(envelopes, key=lambda e: e.seq):
        e, at = env.data, env.time
        if isinstance(e, ev.IssueReported):
            issues[env.subject] = {"areas": chain(e.grid), "reported_at": e.reported_at, "dispatched": False,
                                   "resolved": False, "feedback": False, "resolve_judged": False}
            area(issues[env.subject], "reported", at)
            continue
        i = issues[env.subject]
        t = tasks.get(getattr(e, "task_id", ""), {})
        lead = t.get("role") == "lead"
        match e:
            case ev.TaskDispatched():
                tasks[e.task_id] = t = {"department": e.department, "role": e.role, "ack_due": e.acknowledge_due,
                                        "resolve_due": e.resolve_due, "extended": False, "judged": set()}
                dept(t, "tasks_dispatched", at)
                if e.role == "lead":
                    i["lead"] = e.department
                    area(i, "tasks_dispatched", at)
                    if not i["dispatched"]:
                        i["dispatched"] = True
                        area(i, "issues_dispatched", at)
                        ms = int((at - i["reported_at"]).total_seconds() * 1000)
                        if ms > 0:
                            area(i, "dispatch_ms_sum", at, ms)
            case ev.TaskAcknowledged():
                judge(i, t, "acknowledge", at)
                on_time = e.at <= t["ack_due"]
                for metric in ("tasks_acknowledged", "tasks_ack_on_time") if on_time else ("tasks_acknowledged",):
                    dept(t, metric, at)
                    if lead:
                        area(i, metric, at)
            case ev.TaskReturned():
                dept(t, "tasks_returned", at)
                if lead:
                    area(i, "tasks_returned", at)
            case ev.TaskResolved():
                judge(i, t, "resolve", at)
                dept(t, "tasks_resolved", at)
                if e.at <= t["resolve_due"]:
                    dept(t, "tasks_resolved_on_time", at)
                if lead and not i["resolved"]:
                    i["resolved"] = True
                    area(i, "issues_resolved", at)
            case ev.SlaWarned():
                dept(t, "sla_warned", at)
            case ev.SlaBreached():
                judge(i, t, e.clock, at)
                dept(t, "sla_breached", at)
                if lead:
                    area(i, "sla_breached", at)
            case ev.ExtensionApproved():
                if not t["extended"]:
                    t["extended"] = True
                    dept(t, "tasks_extended", at)
                    if lead:
                        area(i, "tasks_extended", at)
                t["resolve_due"] = e.resolve_due
            case ev.IssueEscalated():
                area(i, "escalated", at)
            case ev.IssueUrged():  # 催办 counts against the task named, else the department leading the issue
                if e.task_id in tasks:
                    dept(tasks[e.task_id], "urged", at)
                elif i.get("lead"):
                    out[("dept", i["lead"], at.astimezone(BJ).date())]["urged"] += 1
                area(i, "urged", at)
            case ev.IssueVerified():
                area(i, "verifications", at)
            case ev.IssueReopened():
                leader(i, "reopened", at)
            case ev.IssueClosed():
                area(i, "closed", at)
                if e.on_time:
                    area(i, "closed_on_time", at)
                if e.reason == "resolved_on_site":
                    area(i, "resolved_on_site", at)
            case ev.FeedbackRecorded():
                if not i["feedback"]:  # the first answer is the one counted
                    i["feedback"] = True
                    leader(i, "feedback", at)
                    if e.satisfaction != "dissatisfied":
                        leader(i, "feedback_satisfied", at)
    return out


def totals(counts: dict[Key, Counter[str]], scope: str, key: str, since: date, until: date,
           drop: frozenset[str] = KNOWN_WRONG) -> dict[str, int]:
    c: Counter[str] = Counter()
    for (s, k, d), metrics in counts.items():
        if s == scope and k == key and since <= d <= until:
            c.update(metrics)
    return {m: n for m, n in c.items() if n and m not in drop}


def without(counts: dict[str, int], drop: frozenset[str] = KNOWN_WRONG) -> dict[str, int]:
    return {m: n for m, n in counts.items() if n and m not in drop}


# -- helpers over the running stack -----------------------------------------------------------------------------
def worker_of(h: NeedleHandle) -> ProjectionWorker:
    w: ProjectionWorker = h.stack.projection_worker
    return w


def pool_of(h: NeedleHandle) -> asyncpg.Pool:
    p: asyncpg.Pool = h.stack.read_models.pool
    return p


def store_of(h: NeedleHandle) -> JetStreamEventStore:
    assert h.stack.store is not None
    return h.stack.store


async def last_seq(h: NeedleHandle) -> int:
    assert h.stack.nc is not None
    info = await h.stack.nc.jetstream().stream_info(sj.EVENTS_STREAM)
    return int(info.state.last_seq)


async def caught_up(h: NeedleHandle, timeout: float = 30.0) -> int:
    seq = await last_seq(h)
    assert await worker_of(h).wait_for(seq, timeout), f"worker at {worker_of(h).seq}, stream at {seq}"
    return seq


async def assert_rows_equal_the_aggregates(pool: asyncpg.Pool, sims: Sequence[IssueSim]) -> None:
    ids = [s.id for s in sims]
    rows = {r["id"]: r for r in await pool.fetch("SELECT * FROM issues WHERE id = ANY($1)", ids)}
    task_rows = {r["id"]: r for r in await pool.fetch("SELECT * FROM tasks WHERE issue_id = ANY($1)", ids)}
    assert set(rows) == set(ids)
    for sim in sims:
        s, row = sim.state, rows[sim.id]
        lead = s.lead.department if s.lead is not None else None
        assert (row["status"], row["level"], row["owner_area"], row["lead_department"]) == (
            s.status, s.level, s.owner_area, lead), sim.id
        assert (row["version"], row["seq"], row["reopen_count"], row["escalations"], row["satisfaction"],
                row["closed_on_time"]) == (s.version, s.last_seq, s.reopen_count, s.escalations, s.satisfaction,
                                           s.closed_on_time), sim.id
        for t in s.tasks:
            r = task_rows[t.id]
            assert (r["status"], r["department"], r["role"], r["level"], r["resolve_due"], r["extended"],
                    set(filter(None, r["breached"].split(",")))) == (
                t.status, t.department, t.role, t.level, t.resolve_due, t.extended, set(t.breached)), t.id
    assert {r["issue_id"] for r in task_rows.values()} <= set(ids)
    assert len(task_rows) == sum(len(s.state.tasks) for s in sims)


# -- property: the read models equal a recount of the stream ------------------------------------------------------
@pytest.fixture
async def projections(needle_factory: Callable[..., Any]) -> NeedleHandle:
    h: NeedleHandle = await needle_factory(services=("intake", "projections"))
    return h


SCRIPT = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 60), st.integers(0, 9)), min_size=10, max_size=60)


@pytest.mark.timeout(600)  # room for hypothesis to shrink a failure
@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(script=SCRIPT)
async def test_stats_and_rows_equal_a_recount_of_random_histories(projections: NeedleHandle,
                                                                  script: list[tuple[int, int, int]]) -> None:
    h = projections
    # given a fresh 100-day window per example, so examples sharing the stack never share a day bucket
    start = T0 + timedelta(days=100 * next(_example_numbers))
    sim = Sim(store_of(h), start)
    for who, what, wait in script:
        await sim.step(who, what, wait, max_issues=5)
    # when the worker has caught up with the stream
    seq = await caught_up(h)
    # then /v1/stats (overall, per child area, per department) equals the recount over the example's days
    counts = recount(sim.envelopes)
    since, until = start.astimezone(BJ).date(), sim.now.astimezone(BJ).date()
    r = await h.client.get("/v1/stats", params={"area": "city", "from": since.isoformat(), "to": until.isoformat()},
                           headers={**h.auth("admin"), "Needle-Min-Seq": str(seq)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert without(body["overall"]["counts"]) == totals(counts, "area", "city", since, until)
    for child, got in body["areas"].items():
        assert without(got["counts"]) == totals(counts, "area", child, since, until), child
    assert set(body["departments"]) == set(ORG.departments)
    for d, got in body["departments"].items():
        assert without(got["counts"]) == totals(counts, "dept", d, since, until), d
        for name, rate in got["rates"].items():
            assert rate["value"] is None or 0 <= rate["value"] <= 1, (d, name, rate)
    # and so does every area's own total, grids included, read with queries.stats
    for a in ORG.areas:
        got = await queries.stats(pool_of(h), area=a, children=[c.id for c in ORG.children(a)], departments=[],
                                  since=since, until=until)
        assert without(got["overall"]["counts"]) == totals(counts, "area", a, since, until), a
    # and day by day for the root
    series = await queries.daily_series(pool_of(h), area="city", since=since, until=until)
    by_day = {date.fromisoformat(d["day"]): without(d["counts"]) for d in series if without(d["counts"])}
    expected_days = {k[2]: totals(counts, "area", "city", k[2], k[2]) for k in counts if k[:2] == ("area", "city")}
    assert by_day == {d: c for d, c in expected_days.items() if c}
    # and every issue row, task row and audit row agrees with the events
    await assert_rows_equal_the_aggregates(pool_of(h), sim.issues)
    audit = await pool_of(h).fetch("SELECT seq, issue_id, type FROM audit WHERE issue_id = ANY($1) ORDER BY seq",
                                   [s.id for s in sim.issues])
    assert [(a["seq"], a["issue_id"], a["type"]) for a in audit] == [
        (e.seq, e.subject, e.data.name) for e in sorted(sim.envelopes, key=lambda e: e.seq)]


@pytest.mark.parametrize("path", ["rework", "escalated after resolving"])
async def test_resolution_rate_counts_an_issue_once(projections: NeedleHandle, path: str) -> None:
    h = projections
    sim = Sim(store_of(h), T0 + timedelta(days=3650), escalate_when_resolved=True)
    issue = await sim.report(0)  # road damage in wuxing-g1, dispatched to the district at once
    for round_ in range(2):  # resolved; then reworked (verification failed) or escalated; resolved again
        lead = issue.state.lead
        assert lead is not None
        await sim.act(issue, ("ack", lead.id))
        await sim.act(issue, ("resolve", lead.id))
        if round_ == 0:
            await sim.act(issue, ("verify", False) if path == "rework" else ("escalate", None))
    await sim.act(issue, ("verify", True))
    assert issue.state.status == "closed"
    seq = await caught_up(h)
    day = sim.now.astimezone(BJ).date().isoformat()
    r = await h.client.get("/v1/stats", params={"area": "city", "from": day, "to": day},
                           headers={**h.auth("admin"), "Needle-Min-Seq": str(seq)})
    resolution = r.json()["overall"]["rates"]["resolution_rate"]
    assert (resolution["numerator"], resolution["denominator"], resolution["value"]) == (1, 1, 1.0)


# -- rebuild during live traffic ----------------------------------------------------------------------------------
async def drive(sim: Sim, rnd: random.Random, steps: int, max_issues: int, stop: asyncio.Event | None = None,
                pause: float = 0.0) -> None:
    for _ in range(steps):
        if stop is not None and stop.is_set():
            return
        await sim.step(rnd.randrange(1 << 16), rnd.randrange(1 << 16), rnd.choice((0, 0, 1, 1, 2, 3)), max_issues)
        if pause:
            await asyncio.sleep(pause)


async def snapshot(pool: asyncpg.Pool) -> dict[str, Any]:
    async with pool.acquire() as conn:
        return {
            "issues": [tuple(r) for r in await conn.fetch("SELECT * FROM issues ORDER BY id")],
            "tasks": [tuple(r) for r in await conn.fetch("SELECT * FROM tasks ORDER BY id")],
            "stats": [tuple(r) for r in await conn.fetch(
                "SELECT scope, key, day, metric, n FROM stats_daily WHERE n <> 0 ORDER BY scope, key, day, metric")],
            "audit": [tuple(r) for r in await conn.fetch("SELECT * FROM audit ORDER BY seq")],
            "checkpoint": await conn.fetchval("SELECT seq FROM checkpoints"),
        }


async def poll_api(h: NeedleHandle, stop: asyncio.Event, seen: list[tuple[str, int]]) -> None:
    headers = h.auth("admin")
    paths = ("/v1/stats?area=city", "/v1/issues?area=city&limit=20", "/v1/overdue?area=dinghai")
    for path in itertools.cycle(paths):
        if stop.is_set():
            return
        try:
            r = await h.client.get(path, headers=headers)
            seen.append((path, r.status_code))
        except Exception as exc:  # an error is what this poll looks for: record it
            seen.append((f"{path} {exc!r}", 0))
        await asyncio.sleep(0.01)


async def test_rebuild_during_live_traffic_ends_identical_to_the_live_tables(projections: NeedleHandle) -> None:
    h = projections
    rnd = random.Random(20250304)
    sims = [Sim(store_of(h), T0 + timedelta(days=i)) for i in range(4)]
    # given a few thousand events already projected
    await asyncio.gather(*(drive(s, random.Random(rnd.random()), 350, 60) for s in sims))
    await caught_up(h)
    # when a rebuild runs while traffic keeps coming and supervisors keep reading
    stop_traffic, stop_polls = asyncio.Event(), asyncio.Event()
    traffic = [asyncio.create_task(drive(s, random.Random(rnd.random()), 10_000, 120, stop_traffic, 0.002))
               for s in sims]
    seen: list[tuple[str, int]] = []
    poller = asyncio.create_task(poll_api(h, stop_polls, seen))
    worker = worker_of(h)
    try:
        await asyncio.sleep(0.3)
        during_from = len(seen)
        before = await last_seq(h)
        # (the replay in a child process, as `needle rebuild` and the worker's start run it)
        report = await rebuild(pool_of(h), h.stack.nc.jetstream(), worker.writer,  # type: ignore[union-attr]
                               database_url=h.stack.urls.database)
        during = seen[during_from:]
        await asyncio.sleep(0.5)
    finally:
        stop_traffic.set()
        await asyncio.gather(*traffic)
        stop_polls.set()
        await poller
    after = await caught_up(h)
    assert report["target_seq"] >= before and after > report["target_seq"], (before, report, after)
    # then the live API answered throughout
    assert during, "no request was made during the rebuild"
    assert all(code == 200 for _, code in seen), [s for s in seen if s[1] != 200][:5]
    # and the tables equal a recount of every event and the issue aggregates
    envelopes = [e for s in sims for e in s.envelopes]
    counts = recount(envelopes)
    live = await snapshot(pool_of(h))
    assert live["checkpoint"] == after
    assert [a[0] for a in live["audit"]] == sorted(e.seq for e in envelopes)
    got: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for scope, key, _, metric, n in live["stats"]:
        if metric not in KNOWN_WRONG:
            got[(scope, key)][metric] += n
    want: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for (scope, key, _), metrics in counts.items():
        want[(scope, key)].update({m: n for m, n in metrics.items() if n and m not in KNOWN_WRONG})
    assert dict(got) == dict(want)
    await assert_rows_equal_the_aggregates(pool_of(h), [i for s in sims for i in s.issues])
    assert report["in_child_process"] and report["spills"] == 0, report
    # and a second rebuild from scratch, with no traffic, gives the very same tables, also when it runs in this
    # process and spills its rows to Postgres past 10 issues (loading them back when their issue comes again)
    again = await rebuild(pool_of(h), h.stack.nc.jetstream(), worker.writer,  # type: ignore[union-attr]
                          max_issues=10, read_batch=100)
    assert not again["in_child_process"] and again["spills"] >= 10, again
    assert await snapshot(pool_of(h)) == live
    # and the live worker carries on projecting after the swap
    extra = Sim(store_of(h), T0 + timedelta(days=30))
    await extra.report(0)
    await caught_up(h)
    row = await pool_of(h).fetchrow("SELECT status FROM issues WHERE id = $1", extra.issues[0].id)
    assert row is not None and row["status"] == extra.issues[0].state.status
