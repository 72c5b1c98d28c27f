"""Projection functions: events -> read-model rows and pre-aggregated day buckets. Pure.

A ``Batch`` holds the rows touched by a batch of events (loaded from the database first, so
folding continues where the last batch stopped) and the counter deltas to add to the
``stats_daily`` buckets. The worker writes all of it, with the checkpoint, in one transaction.

Counters (per day in the rulebook's timezone, per area for the grid and each of its ancestors,
and per department), and the rates of DOMAIN.md built from them. Task counters of an area
count lead tasks (the one accountable per issue); a department's count all of its tasks:

=================  ==========================================  ====================================
rate               numerator                                   denominator
=================  ==========================================  ====================================
响应率 response     tasks_ack_on_time                           tasks_ack_due
解决率 resolution   issues_resolved                             issues_resolve_due
满意率 satisfaction feedback_satisfied                          feedback
按期结案率 on time  closed_on_time                              closed
返工率 rework       reopened                                    verifications
退单率 returns      tasks_returned                              tasks_dispatched
延期率 extensions   tasks_extended                              tasks_dispatched
督办按期率          supervised_on_time                          supervision_closed
=================  ==========================================  ====================================

The resident's own 回访 (ResidentFeedbackRecorded, through the one-time link) takes precedence over the grid
worker's (FeedbackRecorded, by phone): an issue counts once in ``feedback``; when the resident answers after
the worker, ``feedback_satisfied`` moves by the difference on the day of the resident's answer, and a worker's
answer after the resident's counts nothing. A resident who says the problem is NOT solved takes the issue out
of ``issues_resolved`` (and the lead department's ``tasks_resolved``) on that day (``resident_unsolved``).
A department counts ``feedback``/``feedback_satisfied``, ``reopened`` and ``urged`` of the issues it leads.

Fair rates (issue 19): a task's acknowledge clock is judged once, when it is acknowledged or when it breaches,
whichever comes first (``tasks_ack_due``); a task not yet due, or superseded or returned before its clock ran out,
is in no denominator. A department's 解决率 is ``tasks_resolved / tasks_resolve_due`` (resolved, or resolve clock
breached, whichever first). The area's 解决率 is ``issues_resolved / issues_resolve_due``, an issue counted once in
each: ``issues_resolved`` at its first lead resolution, ``issues_resolve_due`` the first time one of its lead tasks'
resolve clock is judged (that resolution, or a resolve breach before it). An issue whose lead is not yet due, or
was superseded (escalated on request, reassigned, returned) before its clock ran out, waits for its next lead.

催办 (``urged``) counts against the task the urge names, else the department leading the issue when the urge was
recorded; ``progress_missed`` (a lead's period without a 阶段性答复) against the lead's department; 督办件数 is
``supervised`` (orders), and a supervised task superseded before it was resolved leaves the 督办按期率.

A rejected, voided or merged issue takes its ``issues_dispatched`` back (``_leave_the_rates``); a merged
issue's close (``issue_closed_with_target``) is not counted: a merged group counts once, by its target.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from typing import Any

from shared.config import OrgTree
from shared.domain.issue import URGENCY_RANK
from shared.events import models as ev
from shared.events.codec import Envelope
from shared.privacy.texts import ERASED

METRICS = (
    "reported", "issues_dispatched", "issues_resolved", "closed", "closed_on_time", "resolved_on_site",
    "verifications", "reopened", "escalated", "feedback", "feedback_satisfied",
    "tasks_dispatched", "tasks_acknowledged", "tasks_ack_on_time", "tasks_resolved", "tasks_resolved_on_time",
    "tasks_returned", "tasks_extended", "sla_warned", "sla_breached", "dispatch_ms_sum",
    "rejected", "voided", "recategorised",
    "returns_requested", "returns_rejected", "tasks_reassigned", "extensions_rejected", "tasks_suspended",
    "urged", "supervised", "supervision_closed", "supervised_on_time", "tasks_ack_due", "tasks_resolve_due",
    "review_warned", "review_breached", "merged", "issues_resolve_due", "progress_missed",
    "resident_feedback", "resident_unsolved",
)
RATES: dict[str, tuple[str, str]] = {
    "response_rate": ("tasks_ack_on_time", "tasks_ack_due"),
    "resolution_rate": ("issues_resolved", "issues_resolve_due"),
    "satisfaction_rate": ("feedback_satisfied", "feedback"),
    "on_time_close_rate": ("closed_on_time", "closed"),
    "rework_rate": ("reopened", "verifications"),
    "return_rate": ("tasks_returned", "tasks_dispatched"),
    "extension_rate": ("tasks_extended", "tasks_dispatched"),
    "supervision_on_time_rate": ("supervised_on_time", "supervision_closed"),
}
DEPT_RATES: dict[str, tuple[str, str]] = {
    "response_rate": ("tasks_ack_on_time", "tasks_ack_due"),
    "resolution_rate": ("tasks_resolved", "tasks_resolve_due"),
    "satisfaction_rate": ("feedback_satisfied", "feedback"),
    "on_time_resolve_rate": ("tasks_resolved_on_time", "tasks_resolved"),
    "return_rate": ("tasks_returned", "tasks_dispatched"),
    "extension_rate": ("tasks_extended", "tasks_dispatched"),
    "supervision_on_time_rate": ("supervised_on_time", "supervision_closed"),
}

StatKey = tuple[date, str, str, str]  # (day, scope "area"|"dept"|"kind", id, metric)
# scope "kind" (key: a department kind) counts routings that found no department of that kind:
# metrics "unserved_lead" (兜底 took the lead) and "unserved_co" (no co-task); /metrics exports them


@dataclass
class Batch:
    org: OrgTree
    tz: tzinfo
    issues: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: Counter[StatKey] = field(default_factory=Counter)
    audit: list[tuple[int, str, str, str | None, datetime, str]] = field(default_factory=list)
    last_seq: int = 0
    tasks_of: dict[str, set[str]] = field(default_factory=dict)  # issue id -> its task ids (an index of ``tasks``)
    visits: dict[str, dict[str, Any]] = field(default_factory=dict)  # household visits touched (走访)
    shredded: dict[str, int] = field(default_factory=dict)  # issue -> seq of its text shred: erase older audit text

    def add_task(self, row: dict[str, Any]) -> None:
        self.tasks[row["id"]] = row
        self.tasks_of.setdefault(row["issue_id"], set()).add(row["id"])

    def load(self, issues: list[dict[str, Any]], tasks: list[dict[str, Any]],
             visits: list[dict[str, Any]] | None = None) -> None:
        """Continue from rows stored by an earlier batch."""
        for row in issues:
            self.issues[row["id"]] = row
        for row in tasks:
            self.add_task(row)
        for row in visits or ():
            self.visits[row["id"]] = row

    def _day(self, at: datetime) -> date:
        return at.astimezone(self.tz).date()

    def count_area(self, issue: dict[str, Any], at: datetime, metric: str, n: int = 1) -> None:
        day = self._day(at)
        for area in issue["areas"]:
            self.stats[(day, "area", area, metric)] += n

    def count_dept(self, dept: str, at: datetime, metric: str, n: int = 1) -> None:
        self.stats[(self._day(at), "dept", dept, metric)] += n


def clean(text: str) -> str:
    """Postgres text cannot hold NUL: drop it rather than let one event stop the read models."""
    return text.replace("\x00", "") if "\x00" in text else text


def _areas(org: OrgTree, grid: str) -> list[str]:
    try:
        return [a.id for a in org.ancestors(grid)]
    except KeyError:
        return [grid]


def new_issue_row(issue_id: str, e: ev.IssueReported, org: OrgTree, seq: int) -> dict[str, Any]:
    areas = _areas(org, e.grid)
    return {
        "id": issue_id, "grid": e.grid, "category": e.category, "title": clean(e.title), "urgency": e.urgency,
        "status": "pending_review" if e.review else "reported", "level": None, "owner_area": None, "areas": areas,
        "reported_at": e.reported_at, "dispatched_at": None, "closed_at": None, "closed_on_time": None,
        "first_resolved_at": None,
        "lead_task": None, "lead_department": None, "lead_status": None,
        "next_due": e.review_due if e.review else None,  # a held report's review clock (受理) until decided
        "reopen_count": 0, "escalations": 0, "satisfaction": None, "feedback_source": None,
        "version": 0, "seq": seq,
        "updated_at": e.reported_at,
        "lat": e.location.lat if e.location else None, "lon": e.location.lon if e.location else None,
        "merged_into": None, "reporter": e.reporter, "text_shredded_at": None,
        "description_public": e.description_public,
    }


def visits_named(envs: list[Envelope]) -> set[str]:
    """The visits a batch of events touches: recorded in it, or named by a report in it."""
    out = set()
    for env in envs:
        if isinstance(env.data, ev.VisitRecorded):
            out.add(env.subject)
        elif isinstance(env.data, ev.IssueReported) and env.data.visit:
            out.add(env.data.visit)
    return out


def _apply_visit(batch: Batch, visit_id: str, e: ev.VisitRecorded, seq: int) -> None:
    if visit_id in batch.visits:
        return
    try:
        areas = [a.id for a in batch.org.ancestors(e.grid)]
    except KeyError:
        areas = [e.grid]
    batch.visits[visit_id] = {
        "id": visit_id, "grid": e.grid, "areas": areas, "household": e.household, "kind": e.kind,
        "campaign": e.campaign, "visited_at": e.visited_at, "visitor": e.by,
        "note": clean(e.note) if e.note is not None else None, "issues": list(dict.fromkeys(e.issues)), "seq": seq,
    }


def _refresh_lead(batch: Batch, issue: dict[str, Any]) -> None:
    """The lead task's state and the next deadline it must meet (for overdue lists)."""
    lead = batch.tasks.get(issue["lead_task"]) if issue["lead_task"] else None
    if lead is None:
        issue["lead_department"] = issue["lead_status"] = None
        if issue["status"] != "pending_review":  # a held report keeps its review clock (受理) until decided
            issue["next_due"] = None
        return
    issue["lead_department"] = lead["department"]
    issue["lead_status"] = lead["status"]
    if lead["status"] == "dispatched":
        issue["next_due"] = lead["acknowledge_due"]
    elif lead["status"] == "acknowledged":
        issue["next_due"] = lead["resolve_due"]
    else:
        issue["next_due"] = None


def apply(batch: Batch, env: Envelope) -> None:
    """Fold one stored event into the batch's rows and counters."""
    e, seq, at = env.data, env.seq, env.time
    issue_id = env.subject
    batch.last_seq = max(batch.last_seq, seq)
    batch.audit.append((seq, issue_id, e.name, env.actor, at, clean(_summary(e))))
    if isinstance(e, ev.VisitRecorded):
        _apply_visit(batch, issue_id, e, seq)
        return
    if isinstance(e, ev.IssueReported):
        if issue_id in batch.issues:
            return
        row = batch.issues[issue_id] = new_issue_row(issue_id, e, batch.org, seq)
        row["version"] = 1
        batch.count_area(row, at, "reported")
        if e.visit and (visit := batch.visits.get(e.visit)) is not None and issue_id not in visit["issues"]:
            visit["issues"] = [*visit["issues"], issue_id]  # the visit lists the issues raised from it
            visit["seq"] = seq
        return
    issue = batch.issues.get(issue_id)
    if issue is None:  # events of an issue whose report we never saw (cannot happen on a full stream)
        return
    issue["version"] += 1
    issue["seq"] = seq
    issue["updated_at"] = at
    match e:
        case ev.IssueRouted():
            issue["level"], issue["owner_area"] = e.level, e.owner_area
            if e.urgency is not None and URGENCY_RANK[e.urgency] > URGENCY_RANK.get(issue["urgency"], 0):
                issue["urgency"] = e.urgency  # the urgency in force (risk flags raise it)
            for u in e.unserved:  # kinds nothing serves: counted per kind (needle_routing_unserved)
                batch.stats[(batch._day(at), "kind", u.kind, f"unserved_{u.role}")] += 1
        case ev.TaskDispatched():
            batch.add_task({
                "id": e.task_id, "issue_id": issue_id, "department": e.department, "role": e.role,
                "level": e.level, "status": "dispatched", "clock": e.clock, "dispatched_at": e.dispatched_at,
                "acknowledge_due": e.acknowledge_due, "resolve_due": e.resolve_due, "acknowledged_at": None,
                "resolved_at": None, "returned_at": None, "breached": "", "extended": False,
                "category": issue["category"], "title": issue["title"], "grid": issue["grid"], "seq": seq,
            })
            batch.count_dept(e.department, at, "tasks_dispatched")
            if e.role == "lead":
                batch.count_area(issue, at, "tasks_dispatched")
                issue["lead_task"] = e.task_id
                if issue["dispatched_at"] is None:
                    issue["dispatched_at"] = at
                    batch.count_area(issue, at, "issues_dispatched")
                    ms = int((at - issue["reported_at"]).total_seconds() * 1000)
                    batch.count_area(issue, at, "dispatch_ms_sum", max(ms, 0))
                if issue["status"] != "closed":
                    issue["status"] = "dispatched"
        case ev.TaskAcknowledged():
            t = batch.tasks.get(e.task_id)
            if t is not None:
                _judged(batch, issue, t, "acknowledge", at)
                t.update(status="acknowledged", acknowledged_at=e.at, seq=seq)
                batch.count_dept(t["department"], at, "tasks_acknowledged")
                on_time = e.at <= t["acknowledge_due"]
                if on_time:
                    batch.count_dept(t["department"], at, "tasks_ack_on_time")
                if t["role"] == "lead":
                    batch.count_area(issue, at, "tasks_acknowledged")
                    if on_time:
                        batch.count_area(issue, at, "tasks_ack_on_time")
                    if issue["status"] == "dispatched":
                        issue["status"] = "in_progress"
        case ev.TaskReturned():
            t = batch.tasks.get(e.task_id)
            if t is not None:
                t.update(status="returned", returned_at=e.at, seq=seq)
                batch.count_dept(t["department"], at, "tasks_returned")
                if t["role"] == "lead":
                    batch.count_area(issue, at, "tasks_returned")
        case ev.TaskResolved():
            t = batch.tasks.get(e.task_id)
            if t is not None:
                if t["role"] == "lead" and not _issue_resolve_judged(batch, issue):
                    batch.count_area(issue, at, "issues_resolve_due")
                _judged(batch, issue, t, "resolve", at)
                t.update(status="resolved", resolved_at=e.at, seq=seq)
                batch.count_dept(t["department"], at, "tasks_resolved")
                if e.at <= t["resolve_due"]:
                    batch.count_dept(t["department"], at, "tasks_resolved_on_time")
                if t["role"] == "lead":
                    issue["status"] = "resolved"
                    if issue.get("first_resolved_at") is None:  # after rework or escalation: still one issue
                        issue["first_resolved_at"] = e.at
                        batch.count_area(issue, at, "issues_resolved")
        case ev.TaskSuperseded():
            t = batch.tasks.get(e.task_id)
            if t is not None:
                t.update(status="superseded", seq=seq)
        case ev.SlaWarned():
            if (t := batch.tasks.get(e.task_id)) is not None:
                batch.count_dept(t["department"], at, "sla_warned")
        case ev.SlaBreached():
            t = batch.tasks.get(e.task_id)
            if t is not None:
                if e.clock == "resolve" and t["role"] == "lead" and not _issue_resolve_judged(batch, issue):
                    batch.count_area(issue, at, "issues_resolve_due")
                _judged(batch, issue, t, e.clock, at)
                t["breached"] = ",".join(sorted({*filter(None, t["breached"].split(",")), e.clock}))
                batch.count_dept(t["department"], at, "sla_breached")
                if t["role"] == "lead":
                    batch.count_area(issue, at, "sla_breached")
        case ev.IssueEscalated():
            issue["escalations"] += 1
            batch.count_area(issue, at, "escalated")
        case ev.ExtensionApproved():
            t = batch.tasks.get(e.task_id)
            if t is not None:
                if not t["extended"]:
                    batch.count_dept(t["department"], at, "tasks_extended")
                    if t["role"] == "lead":
                        batch.count_area(issue, at, "tasks_extended")
                t.update(resolve_due=e.resolve_due, extended=True, seq=seq)
        case ev.IssueVerified():
            batch.count_area(issue, at, "verifications")
        case ev.IssueReopened():
            issue["status"] = "reopened"
            issue["reopen_count"] = e.reopen_count
            batch.count_area(issue, at, "reopened")
            if issue["lead_department"]:
                batch.count_dept(issue["lead_department"], at, "reopened")
            _close_open_tasks(batch, issue_id, seq)
        case ev.ReviewWarned():
            batch.count_area(issue, at, "review_warned")
        case ev.ReviewBreached():
            batch.count_area(issue, at, "review_breached")
        case ev.IssueAccepted():
            issue["status"] = "reported"  # the review clock stops (below)
        case ev.DescriptionPublicationChanged():  # a moderator's decision (anonymous Open311 lists)
            issue["description_public"] = e.public
        case ev.IssueRejected() | ev.IssueVoided():
            issue["status"] = "rejected" if isinstance(e, ev.IssueRejected) else "voided"
            batch.count_area(issue, at, issue["status"])
            _leave_the_rates(batch, issue, at)
            _close_open_tasks(batch, issue_id, seq)
        case ev.IssueRecategorised():
            _close_open_tasks(batch, issue_id, seq)
            issue.update(category=e.to_category, grid=e.to_grid, areas=_areas(batch.org, e.to_grid),
                         status="reported", level=None, owner_area=None)
            batch.count_area(issue, at, "recategorised")
        case ev.IssueMerged():
            issue.update(status="merged", merged_into=e.into)
            batch.count_area(issue, at, "merged")
            _leave_the_rates(batch, issue, at)  # the group is counted once: by its target
            _close_open_tasks(batch, issue_id, seq)
        case ev.IssueTextShredded():  # its free text is gone for good: so from the rows that showed it
            issue.update(title=ERASED, lat=None, lon=None, text_shredded_at=e.at)
            for tid in batch.tasks_of.get(issue_id, ()):
                batch.tasks[tid]["title"] = ERASED
                batch.tasks[tid]["seq"] = seq
            batch.shredded[issue_id] = seq
        case ev.IssueClosedWithTarget():  # closed with its group: counted in the target's close, not again
            issue.update(status="closed", closed_at=e.closed_at, closed_on_time=e.on_time)
        case ev.IssueClosed():
            issue.update(status="closed", closed_at=e.closed_at, closed_on_time=e.on_time)
            batch.count_area(issue, at, "closed")
            if e.on_time:
                batch.count_area(issue, at, "closed_on_time")
            if e.reason == "resolved_on_site":
                batch.count_area(issue, at, "resolved_on_site")
            _close_open_tasks(batch, issue_id, seq)
        case ev.FeedbackRecorded():
            if issue.get("feedback_source") == "resident":
                pass  # the resident's own answer stands (the worker's stays in the audit)
            else:
                if issue["satisfaction"] is None:
                    _count_issue(batch, issue, at, "feedback")
                    if _satisfied(e.satisfaction):
                        _count_issue(batch, issue, at, "feedback_satisfied")
                issue["satisfaction"] = e.satisfaction
                issue["feedback_source"] = "grid_worker_phone"
        case ev.ResidentFeedbackRecorded():
            if issue.get("feedback_source") != "resident":
                before = issue["satisfaction"]
                if before is None:
                    _count_issue(batch, issue, at, "feedback")
                delta = int(_satisfied(e.satisfaction)) - int(before is not None and _satisfied(before))
                if delta:
                    _count_issue(batch, issue, at, "feedback_satisfied", delta)
                _count_issue(batch, issue, at, "resident_feedback")
                if not e.solved and issue.get("first_resolved_at") is not None:
                    batch.count_area(issue, at, "issues_resolved", -1)
                    batch.count_area(issue, at, "resident_unsolved")
                    if issue["lead_department"]:
                        batch.count_dept(issue["lead_department"], at, "tasks_resolved", -1)
                        batch.count_dept(issue["lead_department"], at, "resident_unsolved")
                issue["satisfaction"] = e.satisfaction
                issue["feedback_source"] = "resident"
        case ev.IssueUrged():
            urged = batch.tasks.get(e.task_id) if e.task_id else None
            if urged is not None:  # the task named; else the lead task holding the issue
                batch.count_dept(urged["department"], at, "urged")
            elif issue.get("lead_department"):
                batch.count_dept(issue["lead_department"], at, "urged")
            batch.count_area(issue, at, "urged")
        case ev.ProgressMissed():  # 阶段性答复 missing: against the lead's department (and its area)
            if (t := batch.tasks.get(e.task_id)) is not None:
                batch.count_dept(t["department"], at, "progress_missed")
                batch.count_area(issue, at, "progress_missed")
        case ev.SupervisionOrdered():
            if (t := batch.tasks.get(e.task_id)) is not None:
                batch.count_dept(t["department"], at, "supervised")
                batch.count_area(issue, at, "supervised")
        case ev.SupervisionClosed():
            if (t := batch.tasks.get(e.task_id)) is not None:
                for metric in ("supervision_closed", "supervised_on_time")[:2 if e.on_time else 1]:
                    batch.count_dept(t["department"], at, metric)
                    batch.count_area(issue, at, metric)
        case ev.ReturnRequested() | ev.ReturnRejected() | ev.ReturnApproved() | ev.TaskReassigned() \
                | ev.ExtensionRejected() | ev.SuspensionApproved() | ev.TaskResumed() | ev.ClocksPaused() \
                | ev.ClocksResumed():
            _apply_dispatch_control(batch, issue, e, seq, at)
    _refresh_lead(batch, issue)


def _judged(batch: Batch, issue: dict[str, Any], t: dict[str, Any], clock: str, at: datetime) -> None:
    """A task's clock is judged once: at its acknowledgement / resolution, or at its breach, whichever comes
    first (a breach is recorded only for a clock still running, so the later one sees it in ``breached``)."""
    if clock in t["breached"].split(","):
        return
    metric = "tasks_ack_due" if clock == "acknowledge" else "tasks_resolve_due"
    batch.count_dept(t["department"], at, metric)
    if t["role"] == "lead":
        batch.count_area(issue, at, metric)


_CONTROL_METRIC = {"return_requested": "returns_requested", "return_rejected": "returns_rejected",
                   "task_reassigned": "tasks_reassigned", "extension_rejected": "extensions_rejected",
                   "suspension_approved": "tasks_suspended", "return_approved": "tasks_returned"}


def _apply_dispatch_control(batch: Batch, issue: dict[str, Any], e: ev.Event, seq: int, at: datetime) -> None:
    """退单审核, 改派, 延期驳回, 缓办 (issue 19): the task rows and the department's (and, for a lead, the area's)
    counters. A suspended task is ``suspended`` (no deadline to be overdue on) until it resumes."""
    t = batch.tasks.get(getattr(e, "task_id", ""))
    if t is None:
        return
    if (metric := _CONTROL_METRIC.get(e.name)) is not None:
        batch.count_dept(t["department"], at, metric)
        if t["role"] == "lead":
            batch.count_area(issue, at, metric)
    match e:
        case ev.ReturnApproved():
            t.update(status="returned", returned_at=e.at, seq=seq)
        case ev.SuspensionApproved() | ev.ClocksPaused():  # 缓办, or held for the grid worker's reply (补充材料)
            t.update(status="suspended", seq=seq)
        case ev.TaskResumed() | ev.ClocksResumed():
            t.update(status="acknowledged" if t["acknowledged_at"] else "dispatched", seq=seq,
                     acknowledge_due=e.acknowledge_due, resolve_due=e.resolve_due)


def _issue_resolve_judged(batch: Batch, issue: dict[str, Any]) -> bool:
    """The area's 解决率 judged the issue already: a lead task of it resolved, or its resolve clock breached."""
    if issue.get("first_resolved_at") is not None:
        return True
    return any(t["role"] == "lead" and "resolve" in t["breached"].split(",")
               for t in (batch.tasks[tid] for tid in batch.tasks_of.get(issue["id"], ())))


def _leave_the_rates(batch: Batch, issue: dict[str, Any], at: datetime) -> None:
    """A rejected, voided or merged issue leaves the issue rates: if it was dispatched before the decision (no
    task acknowledged, so nothing resolved), its ``issues_dispatched`` and dispatch time are taken back (on the
    day of the decision), and its ``issues_resolve_due`` if a lead's resolve clock had breached. Its tasks end
    superseded."""
    if issue["dispatched_at"] is None:
        return
    if _issue_resolve_judged(batch, issue):
        batch.count_area(issue, at, "issues_resolve_due", -1)
    batch.count_area(issue, at, "issues_dispatched", -1)
    ms = int((issue["dispatched_at"] - issue["reported_at"]).total_seconds() * 1000)
    batch.count_area(issue, at, "dispatch_ms_sum", -max(ms, 0))


def _satisfied(satisfaction: str) -> bool:
    return satisfaction in ("satisfied", "basically_satisfied")


def _count_issue(batch: Batch, issue: dict[str, Any], at: datetime, metric: str, n: int = 1) -> None:
    """Count for the issue's areas and the department that leads it."""
    batch.count_area(issue, at, metric, n)
    if issue["lead_department"]:
        batch.count_dept(issue["lead_department"], at, metric, n)


def _close_open_tasks(batch: Batch, issue_id: str, seq: int) -> None:
    for tid in batch.tasks_of.get(issue_id, ()):
        t = batch.tasks[tid]
        if t["status"] in ("dispatched", "acknowledged", "suspended"):
            t.update(status="superseded", seq=seq)


def _summary(e: ev.Event) -> str:
    match e:
        case ev.IssueReported():
            return f"reported {e.category} at {e.grid}: {e.title}"
        case ev.VisitRecorded():  # never the household (not even its digest) nor the note
            return f"{e.kind} visit at {e.grid}"
        case ev.IssueRouted():
            return f"routed to {e.level} {e.owner_area} ({e.reason}): {e.rule}"
        case ev.TaskDispatched():
            return f"{e.role} task {e.task_id} to {e.department}"
        case ev.TaskReturned():
            return f"task {e.task_id} returned: {e.reason}"
        case ev.IssueEscalated():
            return f"escalated {e.from_level} -> {e.to_level} ({e.cause})"
        case ev.ReviewBreached() | ev.ReviewWarned():
            return f"review clock {'breached' if isinstance(e, ev.ReviewBreached) else 'warned'} (due {e.due:%H:%M})"
        case ev.SlaBreached() | ev.SlaWarned():
            return f"{e.clock} clock of {e.task_id} {'breached' if isinstance(e, ev.SlaBreached) else 'warned'}"
    fields = {k: v for k, v in e.model_dump(mode="json").items() if k in ("task_id", "by", "satisfaction", "passed")}
    return f"{e.name} {fields}" if fields else e.name


def rates(counts: dict[str, int], table: dict[str, tuple[str, str]] = RATES) -> dict[str, dict[str, Any]]:
    """Each rate with the counts behind it: {rate: {value, numerator, denominator}}."""
    out: dict[str, dict[str, Any]] = {}
    for name, (num, den) in table.items():
        n, d = int(counts.get(num, 0)), int(counts.get(den, 0))
        out[name] = {"value": round(n / d, 4) if d else None, "numerator": n, "denominator": d,
                     "counts": [num, den]}
    return out
