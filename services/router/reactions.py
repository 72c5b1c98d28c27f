"""What the router does when something happens to an issue, as pure functions.

``react(state, event, seq, ...)`` answers a recorded event; ``on_timer(...)`` answers an SLA
clock edge. Both look at the issue's *current* state (the event is only the cue), return the
events to append, and mark them ``caused_by`` the cue's stream sequence so that a redelivered
cue changes nothing (exactly once, together with OCC on append).

Decisions documented here:
* Escalating supersedes every open task of the lower level (they stay visible, status
  ``superseded``) and dispatches the upper level's lead and co-handlers. The upper area's
  command centre gets a co-task (督办) when it is not already the lead.
* A lead's return (退单) escalates when ``return`` is in ``escalate.on``; otherwise the owner
  area's command centre takes the lead (兜底). A co-handler's return only closes its task.
* An approved return (退单审核, issue 19) without a department to take it escalates a lead's task, like an
  unreviewed return; at the city it stays on record for the command centre.
* A suspended task (缓办) has no clock edge but its review date's reminder (``suspension_review_due``).
* A failed verification re-dispatches the same level; the second one escalates when
  ``verification_failed_twice`` is in ``escalate.on``.
* A breach is recorded for any task whose clock ran out; only the lead's breach escalates, and
  only while the clock is still running (an acknowledgement a millisecond before the deadline
  stops it).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.config import OrgTree, Rulebook
from shared.domain import ids
from shared.domain.clocks import SlaClocks
from shared.domain.errors import DomainError
from shared.domain.issue import ISSUE_ENDED, IssueState, TaskState, evolve
from shared.domain.levels import Level
from shared.events import models as ev

from .routing import (
    RoutePlan,
    TaskPlan,
    effective_urgency,
    plan_escalation,
    plan_route,
    start_level,
)


@dataclass(frozen=True)
class RouterRules:
    org: OrgTree
    rulebook: Rulebook
    clocks: SlaClocks


@dataclass(frozen=True, slots=True)
class TimerEdge:
    task_id: str
    clock: str  # acknowledge | resolve
    edge: str  # warn | due


def _dispatch(state: IssueState, plan: RoutePlan, rules: RouterRules, now: datetime, *, reason: str,
              caused_by: int, supervise: bool = False) -> list[ev.Event]:
    tasks: list[TaskPlan] = list(plan.tasks)
    fallback = rules.rulebook.fallback
    if supervise and plan.lead.kind != fallback:
        center = rules.org.department_of_kind(plan.owner_area, fallback)
        if center is not None and all(t.department != center.id for t in tasks):
            tasks.append(TaskPlan(department=center.id, role="co", kind=fallback))
    urgency = effective_urgency(rules.rulebook, state.urgency, state.risk)
    d = rules.clocks.for_dispatch(rules.rulebook, state.category, urgency, now)
    out: list[ev.Event] = [ev.IssueRouted(level=plan.level.value, owner_area=plan.owner_area, reason=reason,  # type: ignore[arg-type]
                                          rule=plan.rule, rulebook_version=plan.rulebook_version,
                                          caused_by=caused_by, urgency=urgency,  # type: ignore[arg-type]
                                          unserved=tuple(ev.UnservedKind(kind=u.kind, area=u.area, role=u.role)
                                                         for u in plan.unserved))]
    out += [ev.TaskSuperseded(task_id=t.id, reason=f"{reason} to {plan.level.value}", caused_by=caused_by)
            for t in state.open_tasks]
    n = len(state.tasks)
    for i, t in enumerate(tasks, 1):
        out.append(ev.TaskDispatched(
            task_id=ids.task_id(state.id, n + i), department=t.department, role=t.role, level=plan.level.value,
            clock=d.clock, dispatched_at=now,  # type: ignore[arg-type]
            acknowledge_due=d.acknowledge_due, resolve_due=d.resolve_due,
            acknowledge_warn=d.acknowledge_warn, resolve_warn=d.resolve_warn, caused_by=caused_by))
    return out


def _escalate(state: IssueState, rules: RouterRules, now: datetime, *, cause: str, caused_by: int,
              reason: str | None = None) -> list[ev.Event]:
    assert state.level is not None
    plan = plan_escalation(rules.org, rules.rulebook, state.grid, state.category, Level(state.level))
    if plan is None:  # at the city: nobody above; the breach or return stays on record for supervisors
        return []
    return [ev.IssueEscalated(from_level=state.level, to_level=plan.level.value, cause=cause,  # type: ignore[arg-type]
                              reason=reason, caused_by=caused_by),
            *_dispatch(state, plan, rules, now, reason="escalated", caused_by=caused_by, supervise=True)]


def _route_report(state: IssueState, rules: RouterRules, now: datetime, seq: int) -> list[ev.Event]:
    level = start_level(rules.rulebook, state.category, state.urgency, state.risk)
    plan = plan_route(rules.org, rules.rulebook, state.grid, state.category, level)
    reason = "risk" if level != rules.rulebook.category(state.category).start else "reported"
    return _dispatch(state, plan, rules, now, reason=reason, caused_by=seq)


def react(state: IssueState, event: ev.Event, seq: int, rules: RouterRules, now: datetime) -> list[ev.Event]:
    """The router's answer to the event stored at ``seq`` (empty when nothing is to be done)."""
    if seq in state.handled or not state.exists or state.status in ISSUE_ENDED:
        return []
    match event:
        case ev.IssueReported():
            # a report handled on the spot (即报即处) is closed in its own append: never dispatched, even when
            # only the report itself has been folded (the router's batched fast path)
            if state.status != "reported" or state.tasks or event.resolved_on_site:
                return []
            return _route_report(state, rules, now, seq)
        case ev.IssueAccepted() | ev.IssueRecategorised():
            # 受理 / 改类: routed as a new report would be (with new clocks); the tasks of a recategorised issue
            # were superseded by the event itself
            if state.status != "reported" or state.open_tasks:
                return []
            return _route_report(state, rules, now, seq)
        case ev.TaskReturned():
            t = state.task(event.task_id)
            if t.role != "lead" or state.lead is not t or any(x.role == "lead" for x in state.open_tasks):
                return []
            if "return" in rules.rulebook.escalate_on:
                out = _escalate(state, rules, now, cause="return", caused_by=seq, reason=event.reason)
                if out:
                    return out
            return _fallback_dispatch(state, rules, now, returned=t, caused_by=seq)
        case ev.ReturnApproved() if event.to_department is None:
            # 退单同意 with nobody else to take it: a lead's return escalates (a co-handler's just ends)
            t = state.task(event.task_id)
            if t.role != "lead" or state.lead is not t or any(x.role == "lead" for x in state.open_tasks):
                return []
            return _escalate(state, rules, now, cause="return", caused_by=seq, reason=t.return_reason)
        case ev.IssueEscalated() if event.cause == "requested":
            if state.level is not None and Level(state.level).rank >= Level(event.to_level).rank:
                return []  # already there or higher (breaches moved it meanwhile): never move an issue down
            plan = plan_route(rules.org, rules.rulebook, state.grid, state.category, Level(event.to_level))
            return _dispatch(state, plan, rules, now, reason="escalated", caused_by=seq, supervise=True)
        case ev.IssueReopened():
            if state.status != "reopened":
                return []
            if state.failed_verifications >= 2 and "verification_failed_twice" in rules.rulebook.escalate_on:
                out = _escalate(state, rules, now, cause="verification_failed_twice", caused_by=seq)
                if out:
                    return out
            assert state.level is not None
            plan = plan_route(rules.org, rules.rulebook, state.grid, state.category, Level(state.level))
            return _dispatch(state, plan, rules, now, reason="reopened", caused_by=seq)
    return []


# -- 合并办理: reactions across two issues ---------------------------------------------------------------------
def attach_duplicate(target: IssueState, duplicate: str, seq: int, now: datetime) -> list[ev.Event]:
    """A duplicate was merged into ``target`` (the cue at ``seq``): recorded on the target, so that closing it
    closes the duplicate. Nothing when already handled; when the target closed meanwhile the duplicate is
    closed instead (``close_with_target``)."""
    if seq in target.handled or not target.exists or target.status in ISSUE_ENDED or duplicate in target.duplicates:
        return []
    return [ev.IssueDuplicateAttached(duplicate=duplicate, caused_by=seq)]


def close_with_target(duplicate: IssueState, target: IssueState, seq: int, now: datetime) -> list[ev.Event]:
    """The target a duplicate was merged into has closed (or was found closed): the duplicate closes with it,
    once (its status is then ``closed``). On time when the target closed on time."""
    if seq in duplicate.handled or duplicate.status != "merged" or duplicate.merged_into != target.id:
        return []
    if target.status != "closed":
        return []
    return [ev.IssueClosedWithTarget(into=target.id, on_time=bool(target.closed_on_time),
                                     closed_at=target.closed_at or now, caused_by=seq)]


def _fallback_dispatch(state: IssueState, rules: RouterRules, now: datetime, *, returned: TaskState,
                       caused_by: int) -> list[ev.Event]:
    """兜底: the owner area's command centre takes a returned lead (unless it was the one returning)."""
    assert state.level is not None and state.owner_area is not None
    fallback = rules.rulebook.fallback
    center = rules.org.department_of_kind(state.owner_area, fallback)
    if center is None or center.id == returned.department:
        return []
    plan = RoutePlan(level=Level(state.level), owner_area=state.owner_area,
                     tasks=(TaskPlan(department=center.id, role="lead", kind=fallback),),
                     rule=f"兜底: {returned.department} returned the lead task; {center.id} takes it",
                     rulebook_version=rules.rulebook.version)
    return _dispatch(state, plan, rules, now, reason="returned", caused_by=caused_by)


def _breaches_of_others(state: IssueState, lead: TaskState, now: datetime) -> list[ev.Event]:
    """Breaches already due on the other open tasks, whatever order their timers fire in."""
    out: list[ev.Event] = []
    for other in state.open_tasks:
        if other.id == lead.id:
            continue
        for at, e in pending_edges(other):
            if at <= now and e.edge == "due" and e.clock != "suspension":
                due = other.acknowledge_due if e.clock == "acknowledge" else other.resolve_due
                out.append(ev.SlaBreached(task_id=other.id, clock=e.clock, due=due))  # type: ignore[arg-type]
    return out


# -- SLA clocks -----------------------------------------------------------------------------------------------
def pending_edges(task: TaskState, progress_every: timedelta | None = None) -> list[tuple[datetime, TimerEdge]]:
    """The task's clock edges still to fire, earliest first. ``progress_every``: the rulebook's period of the
    lead's progress reports (阶段性答复) for the issue's category, if any."""
    if not task.open:
        return []
    if task.suspended_at is not None:  # 缓办: the clocks are paused; only the review date's reminder is due
        if task.suspended_until is None or "suspension" in task.warned:
            return []
        return [(task.suspended_until, TimerEdge(task.id, "suspension", "due"))]
    if task.info_paused_at is not None:  # 补充材料: the clocks wait for the grid worker's reply
        reminder = next_supervision_reminder(task)
        return [] if reminder is None else [(reminder, TimerEdge(task.id, "supervision", "warn"))]
    edges: list[tuple[datetime, TimerEdge]] = []
    if task.status == "dispatched":
        if "acknowledge" not in task.warned:
            edges.append((task.acknowledge_warn, TimerEdge(task.id, "acknowledge", "warn")))
        if "acknowledge" not in task.breached:
            edges.append((task.acknowledge_due, TimerEdge(task.id, "acknowledge", "due")))
    if "resolve" not in task.warned:
        edges.append((task.resolve_warn, TimerEdge(task.id, "resolve", "warn")))
    if "resolve" not in task.breached:
        edges.append((task.resolve_due, TimerEdge(task.id, "resolve", "due")))
    if (reminder := next_supervision_reminder(task)) is not None:
        edges.append((reminder, TimerEdge(task.id, "supervision", "warn")))
    if (report_due := next_progress_due(task, progress_every)) is not None:
        edges.append((report_due, TimerEdge(task.id, "progress", "warn")))
    return sorted(edges, key=lambda e: (e[0], e[1].edge == "due"))


def next_supervision_reminder(task: TaskState) -> datetime | None:
    """督办: the next reminder of a supervised open task (every ``supervision_every`` from the order)."""
    if task.supervised_at is None or task.supervision_every is None:
        return None
    return (task.supervision_reminded or task.supervised_at) + task.supervision_every


def next_progress_due(task: TaskState, every: timedelta | None) -> datetime | None:
    """阶段性答复: when the lead task's next progress report is due — ``every`` after the latest of its dispatch,
    its last progress report and the end of the last period that went without one (warned). None when the
    rulebook asks for none or the task is no open lead. A suspended or held task is not asked (no edge)."""
    if every is None or task.role != "lead" or not task.open:
        return None
    return max(task.dispatched_at, task.progress_at or task.dispatched_at,
               task.progress_missed or task.dispatched_at) + every


def progress_every(rules: RouterRules, state: IssueState) -> timedelta | None:
    """The rulebook's ``progress_every`` for the issue's category (the top level's for an unknown one)."""
    return rules.rulebook.dispatch_for(state.category).progress_every


def next_edge(task: TaskState, progress: timedelta | None = None) -> tuple[datetime, TimerEdge] | None:
    """The task's next clock edge still to fire, or None when its clocks are done."""
    edges = pending_edges(task, progress)
    return edges[0] if edges else None


def on_timer(state: IssueState, task_id: str, rules: RouterRules, now: datetime) -> list[ev.Event]:
    """A task's timer fired: re-check the current state and warn or breach every edge now past.

    An edge that is not yet due (the timer fired early, or an extension moved the due time)
    does nothing; the caller schedules the next edge from the new state."""
    if not state.exists or state.status in ISSUE_ENDED:
        return []
    try:
        t = state.task(task_id)
    except Exception:
        return []
    out: list[ev.Event] = []
    for at, edge in pending_edges(t, progress_every(rules, state)):
        if at > now:
            break
        answer = _at_edge(state, t, edge, rules, now)
        out += answer
        if any(isinstance(e, ev.IssueEscalated) for e in answer):
            break
    return out


def _at_edge(state: IssueState, t: TaskState, edge: TimerEdge, rules: RouterRules, now: datetime) -> list[ev.Event]:
    """The events of one clock edge of ``t`` that is past: a warning, or a breach (and, for the lead when the
    rulebook says so, the breaches already due on the other tasks and the escalation that supersedes them)."""
    if edge.clock == "supervision":
        at = next_supervision_reminder(t)
        assert at is not None and t.supervised_due is not None
        return [ev.SupervisionReminded(task_id=t.id, due=t.supervised_due, at=at)]
    if edge.clock == "suspension":
        assert t.suspended_until is not None
        return [ev.SuspensionReviewDue(task_id=t.id, until=t.suspended_until)]
    if edge.clock == "progress":
        report_due = next_progress_due(t, progress_every(rules, state))
        assert report_due is not None
        return [ev.ProgressMissed(task_id=t.id, due=report_due)]
    due = t.acknowledge_due if edge.clock == "acknowledge" else t.resolve_due
    if edge.edge == "warn":
        return [ev.SlaWarned(task_id=t.id, clock=edge.clock, due=due)]  # type: ignore[arg-type]
    out: list[ev.Event] = [ev.SlaBreached(task_id=t.id, clock=edge.clock, due=due)]  # type: ignore[arg-type]
    if t.role == "lead" and f"{edge.clock}_breach" in rules.rulebook.escalate_on and state.lead is t:
        escalation = _escalate(state, rules, now, cause=f"{edge.clock}_breach", caused_by=0)
        if escalation:  # the escalation supersedes the other tasks: record their breaches first
            return out + _breaches_of_others(state, t, now) + escalation
    return out


# -- one timer per dispatch -------------------------------------------------------------------------------------
def dispatch_of(state: IssueState, task_id: str) -> tuple[TaskState, ...]:
    """The tasks dispatched together with ``task_id`` (one append: same time and level; lead first). They share
    their deadlines, and a dispatch supersedes every task still open, so at most one dispatch has clocks."""
    t = state.task(task_id)
    return tuple(x for x in state.tasks if x.dispatched_at == t.dispatched_at and x.level == t.level)


def dispatch_timer(state: IssueState, task_id: str, progress: timedelta | None = None) -> tuple[str, datetime] | None:
    """The timer of the dispatch ``task_id`` belongs to: (its first task, the earliest edge still to fire over
    its open tasks), or None when its clocks are done. One timer per dispatch, not per task: the lead and the
    co-tasks would race each other for the issue (OCC). Not one per issue either: a timer set from a state that
    missed a new dispatch would replace the new dispatch's earlier one. A state that missed events of the same
    dispatch gives an earlier edge (acks, warnings, extensions only move edges later): early, never late."""
    if not state.exists or state.status in ISSUE_ENDED:
        return None
    try:
        group = dispatch_of(state, task_id)
    except DomainError:
        return None
    nxt = min((e[0] for t in group if (e := next_edge(t, progress)) is not None), default=None)
    return None if nxt is None else (group[0].id, nxt)


def latest_dispatch_timer(state: IssueState, progress: timedelta | None = None) -> tuple[str, datetime] | None:
    """The timer of the issue's latest dispatch (the one whose tasks may be open)."""
    return dispatch_timer(state, state.tasks[-1].id, progress) if state.tasks else None


REVIEW_TIMER = "-review"  # the review clock's timer key: ``<issue id>-review`` (task keys end in a number)


def review_key(issue_id: str) -> str:
    return f"{issue_id}{REVIEW_TIMER}"


def is_review_key(key: str) -> bool:
    return key.endswith(REVIEW_TIMER)


def review_timer(state: IssueState) -> tuple[str, datetime] | None:
    """The timer of the issue's review clock (受理): (its key, the next edge), or None once the report left
    pending_review or both edges fired. One per issue, keyed apart from the dispatches' timers."""
    edges = state.review_edges
    return (review_key(state.id), edges[0][0]) if edges else None


def on_review_clock(state: IssueState, now: datetime) -> list[ev.Event]:
    """The review clock's edges now past, for a report still held in pending_review: a warning, then a breach.
    A held report is never moved by its breach: it stays for the command centre (the breach is on record and in
    the overdue list)."""
    out: list[ev.Event] = []
    for at, edge in state.review_edges:
        if at > now:
            break
        assert state.review_due is not None
        out.append(ev.ReviewWarned(due=state.review_due) if edge == "warn" else ev.ReviewBreached(due=state.review_due))
    return out


def on_issue_timer(state: IssueState, rules: RouterRules, now: datetime) -> list[ev.Event]:
    """The issue's timer fired: every clock edge now past, over all its open tasks, in time order (warnings
    before breaches at the same instant); a breach that escalates ends the answer (the escalation supersedes
    the other tasks). Looks only at the current state, so a fired timer handled twice answers nothing more
    the second time, and a task acknowledged before its deadline is never breached."""
    if not state.exists or state.status in ISSUE_ENDED:
        return []
    out: list[ev.Event] = on_review_clock(state, now)
    s = state
    progress = progress_every(rules, state)
    for _ in range(4 * len(state.tasks) + 1):  # each round records one edge: bounded
        past = [(at, edge.edge == "due", i, edge, t) for i, t in enumerate(s.open_tasks)
                for at, edge in pending_edges(t, progress) if at <= now]
        if not past:
            break
        *_, edge, t = min(past, key=lambda p: p[:3])
        answer = _at_edge(s, t, edge, rules, now)
        out += answer
        if any(isinstance(e, ev.IssueEscalated) for e in answer):
            break
        for e in answer:
            s = evolve(s, e, 0)
    return out
