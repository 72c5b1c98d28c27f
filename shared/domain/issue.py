"""The issue aggregate as a Decider: ``evolve(state, event) -> state`` and
``decide(state, command, now) -> events``. Pure: no IO, time and ids come in as arguments."""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, TypeVar

from shared.events import models as ev

from . import commands as cmd
from . import ids
from .errors import Conflict, Invalid, NotFound
from .evidence import require_photo

URGENCY_RANK: dict[str, int] = {"normal": 0, "urgent": 1, "emergency": 2}
TASK_OPEN = frozenset({"dispatched", "acknowledged"})
ISSUE_OPEN = frozenset({"pending_review", "reported", "dispatched", "in_progress", "resolved", "reopened"})
ISSUE_ENDED = frozenset({"closed", "rejected", "voided", "merged"})  # nothing more is done for these
_D = TypeVar("_D")


@dataclass(frozen=True, slots=True)
class TaskState:
    id: str
    department: str
    role: str
    level: str
    clock: str
    status: str  # dispatched | acknowledged | returned | resolved | superseded
    dispatched_at: datetime
    acknowledge_due: datetime
    resolve_due: datetime
    acknowledge_warn: datetime
    resolve_warn: datetime
    acknowledged_at: datetime | None = None
    resolved_at: datetime | None = None
    returned_at: datetime | None = None
    return_reason: str | None = None
    note: str | None = None
    warned: frozenset[str] = frozenset()
    breached: frozenset[str] = frozenset()
    extension_requested: timedelta | None = None
    extended: bool = False
    # dispatch control (issue 19)
    return_requested: str | None = None  # 退单申请 awaiting the command centre: its reason
    return_rejections: int = 0  # 退单驳回
    extensions: int = 0  # approved extensions
    suspension_requested: datetime | None = None  # the review date asked for
    suspension_reason: str | None = None
    suspended_at: datetime | None = None  # clocks paused since (缓办), None when running
    suspended_until: datetime | None = None  # the review date
    suspensions: int = 0  # approved suspensions
    suspended_for: timedelta = timedelta(0)  # the time the clocks were paused, over every suspension
    reassigned_to: str | None = None  # the task that took this one over (改派, 退单同意)
    urges: int = 0  # 催办 while this task led the issue
    supervised_at: datetime | None = None  # 督办 ordered at
    supervised_due: datetime | None = None
    supervision_every: timedelta | None = None
    supervision_reminded: datetime | None = None  # the latest reminder's scheduled time
    info_paused_at: datetime | None = None  # clocks held by an info request (补充材料) since, until the reply
    progress_at: datetime | None = None  # the latest progress report (阶段性答复) on this task
    progress_missed: datetime | None = None  # the end of the latest period without one (warned)

    @property
    def suspended(self) -> bool:
        return self.suspended_at is not None

    @property
    def open(self) -> bool:
        return self.status in TASK_OPEN


@dataclass(frozen=True, slots=True)
class MediaItem:
    """A medium the issue references: when (``stage``: report | resolve | verify | on_site), by whom, which
    task's resolve (``task_id``), and its ``phase`` (before | after | other)."""

    id: str
    phase: str
    stage: str
    by: str
    task_id: str | None = None


def _media(refs: tuple[ev.MediaRef, ...], stage: str, by: str, task_id: str | None = None) -> tuple[MediaItem, ...]:
    return tuple(MediaItem(m.id, m.phase, stage, by, task_id) for m in refs)


@dataclass(frozen=True, slots=True)
class IssueState:
    id: str
    grid: str = ""
    category: str = ""
    title: str = ""
    description: str | None = None
    urgency: str = "normal"  # the urgency in force: the reported one, raised by routing (risk flags)
    risk: tuple[str, ...] = ()
    location: ev.Location | None = None
    reporter: str = ""
    reported_at: datetime | None = None
    request_hash: str | None = None
    campaign: str | None = None
    resident: ev.ResidentRef | None = None  # sealed; readable only while the resident's key exists
    visit: str | None = None  # the household visit (走访) the report came from
    households_target: int | None = None  # a campaign's issue: the households of the grid it must reach
    status: str = "new"
    level: str | None = None
    owner_area: str | None = None
    rule: str | None = None
    rulebook_version: str | None = None
    unserved: tuple[ev.UnservedKind, ...] = ()  # the last routing's kinds that nothing serves
    tasks: tuple[TaskState, ...] = ()
    version: int = 0
    last_seq: int = 0
    reopen_count: int = 0
    failed_verifications: int = 0
    escalations: int = 0
    closed_at: datetime | None = None
    closed_on_time: bool | None = None
    satisfaction: str | None = None
    resident_feedback: bool = False  # the resident answered the one-time 回访 link (it works once)
    media: tuple[MediaItem, ...] = ()  # every medium referenced, in the order of the events
    media_url: str | None = None  # an external link given with the report (never fetched)
    triage: str | None = None  # the last triage decision: accepted | rejected | voided | recategorised
    triage_reason: str | None = None
    triaged_by: str | None = None
    merged_into: str | None = None  # 合并办理: the issue this one is handled with
    duplicates: tuple[str, ...] = ()  # the issues merged into this one (attached by the router)
    review_due: datetime | None = None  # the review clock of a report held for 受理 (rulebook sla.review)
    review_warn: datetime | None = None
    review_warned: bool = False
    review_breached: bool = False
    handled: frozenset[int] = field(default_factory=frozenset)  # causing seqs the router already reacted to
    comments: int = 0  # comments, progress reports and information requests/replies (issue 19)
    last_progress_at: datetime | None = None  # the lead's latest progress report (阶段性答复)
    first_dispatch_at: datetime | None = None  # 按期结案 is measured from here ...
    first_resolve_due: datetime | None = None  # ... against the first lead's resolve clock as dispatched
    granted: timedelta = timedelta(0)  # plus the time approved extensions and suspensions moved the resolve due
    text_shredded_at: datetime | None = None  # the free text's key was destroyed (retention, or by hand)
    # the description in anonymous reads (Open311): marked public by the reporter, or as a moderator last decided
    description_public: bool = False
    publication_by: str | None = None  # the moderator's last decision: who, and why (never published)
    publication_reason: str | None = None

    @property
    def exists(self) -> bool:
        return self.version > 0

    @property
    def review_edges(self) -> tuple[tuple[datetime, str], ...]:
        """The review clock's edges still to fire, earliest first (``warn`` | ``due``): only while the report
        is held in pending_review."""
        if self.status != "pending_review" or self.review_due is None:
            return ()
        out: list[tuple[datetime, str]] = []
        if not self.review_warned and self.review_warn is not None:
            out.append((self.review_warn, "warn"))
        if not self.review_breached:
            out.append((self.review_due, "due"))
        return tuple(out)

    @property
    def open_tasks(self) -> tuple[TaskState, ...]:
        return tuple(t for t in self.tasks if t.open)

    @property
    def lead(self) -> TaskState | None:
        """The current lead task (the latest one dispatched)."""
        for t in reversed(self.tasks):
            if t.role == "lead" and t.status != "superseded":
                return t
        return None

    def task(self, task_id: str) -> TaskState:
        for t in self.tasks:
            if t.id == task_id:
                return t
        raise NotFound(f"task {task_id} not found", field="task_id")


def initial_state(issue_id: str) -> IssueState:
    return IssueState(id=issue_id)


def _replacer(cls: type[_D]) -> Callable[..., _D]:
    """``dataclasses.replace`` for the fold's hot path, where it was most of the cost of loading an issue:
    the fields are read by one ``attrgetter`` (in C) and the changed ones put in place, then one constructor
    call. Every field of ``cls`` is an ``__init__`` field, in declaration order; an unknown name is a
    KeyError."""
    if not all(f.init for f in fields(cls)):  # type: ignore[arg-type]
        raise TypeError(f"{cls.__name__} has a field outside __init__")
    names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
    values_of = operator.attrgetter(*names)
    index = {name: i for i, name in enumerate(names)}

    def with_changes(obj: _D, /, **changes: Any) -> _D:
        values = list(values_of(obj))
        for name, value in changes.items():
            values[index[name]] = value
        return cls(*values)

    with_changes.__name__ = f"replace_{cls.__name__}"
    return with_changes


_issue_with = _replacer(IssueState)
_task_with = _replacer(TaskState)


def _set_task(state: IssueState, task_id: str, **changes: object) -> tuple[TaskState, ...]:
    return tuple(_task_with(t, **changes) if t.id == task_id else t for t in state.tasks)


def _superseded(tasks: tuple[TaskState, ...]) -> tuple[TaskState, ...]:
    return tuple(_task_with(t, status="superseded") if t.open else t for t in tasks)


def evolve(state: IssueState, event: ev.Event, seq: int = 0) -> IssueState:
    """Fold one event into the state. Unknown or irrelevant events only bump the version."""
    changes: dict[str, Any] = {"version": state.version + 1, "last_seq": seq or state.last_seq}
    caused_by = getattr(event, "caused_by", 0)
    if caused_by:
        changes["handled"] = state.handled | {caused_by}
    match event:
        case ev.IssueReported():
            changes.update(
                grid=event.grid, category=event.category, title=event.title, description=event.description,
                urgency=event.urgency, risk=event.risk, location=event.location, reporter=event.reporter,
                reported_at=event.reported_at, request_hash=event.request_hash, campaign=event.campaign,
                resident=event.resident, visit=event.visit, households_target=event.households_target,
                media=_media(event.media, "report", event.reporter),
                media_url=event.media_url, status="pending_review" if event.review else "reported",
                review_due=event.review_due, review_warn=event.review_warn,
                description_public=event.description_public,
            )
        case ev.DescriptionPublicationChanged():
            changes.update(description_public=event.public, publication_by=event.by,
                           publication_reason=event.reason)
        case ev.IssueAccepted():
            changes.update(status="reported", triage="accepted", triage_reason=event.reason, triaged_by=event.by)
        case ev.IssueRejected():
            changes.update(status="rejected", triage="rejected", triage_reason=event.reason, triaged_by=event.by,
                           tasks=_superseded(state.tasks))
        case ev.IssueVoided():
            changes.update(status="voided", triage="voided", triage_reason=event.reason, triaged_by=event.by,
                           tasks=_superseded(state.tasks))
        case ev.IssueRecategorised():
            changes.update(category=event.to_category, grid=event.to_grid, status="reported", level=None,
                           owner_area=None, rule=None, tasks=_superseded(state.tasks), triage="recategorised",
                           triage_reason=event.reason, triaged_by=event.by)
        case ev.IssueMerged():
            changes.update(status="merged", merged_into=event.into, triage="merged", triage_reason=event.reason,
                           triaged_by=event.by, tasks=_superseded(state.tasks))
        case ev.IssueDuplicateAttached():
            if event.duplicate not in state.duplicates:
                changes["duplicates"] = (*state.duplicates, event.duplicate)
        case ev.IssueClosedWithTarget():
            changes.update(status="closed", closed_at=event.closed_at, closed_on_time=event.on_time,
                           tasks=_superseded(state.tasks))
        case ev.IssueResolvedOnSite():
            if event.media:
                changes["media"] = state.media + _media(event.media, "on_site", event.by)
        case ev.IssueRouted():
            changes.update(level=event.level, owner_area=event.owner_area, rule=event.rule,
                           rulebook_version=event.rulebook_version, unserved=event.unserved)
            if event.urgency is not None and URGENCY_RANK[event.urgency] > URGENCY_RANK.get(state.urgency, 0):
                changes["urgency"] = event.urgency  # the urgency in force: raised by risk flags, never lowered
        case ev.TaskDispatched():
            task = TaskState(
                id=event.task_id, department=event.department, role=event.role, level=event.level,
                clock=event.clock, status="dispatched", dispatched_at=event.dispatched_at,
                acknowledge_due=event.acknowledge_due, resolve_due=event.resolve_due,
                acknowledge_warn=event.acknowledge_warn, resolve_warn=event.resolve_warn,
            )
            changes["tasks"] = (*state.tasks, task)
            if event.role == "lead":  # a new lead (first dispatch, escalation, fallback, rework): not acknowledged yet
                changes["status"] = "dispatched"
                if state.first_dispatch_at is None:
                    changes.update(first_dispatch_at=event.dispatched_at, first_resolve_due=event.resolve_due)
        case ev.TaskAcknowledged():
            changes["tasks"] = _set_task(state, event.task_id, status="acknowledged", acknowledged_at=event.at)
            if state.status == "dispatched" and state.task(event.task_id).role == "lead":
                changes["status"] = "in_progress"
        case ev.TaskReturned():
            changes["tasks"] = _set_task(state, event.task_id, status="returned", returned_at=event.at,
                                         return_reason=event.reason)
        case ev.TaskResolved():
            changes["tasks"] = _set_task(state, event.task_id, status="resolved", resolved_at=event.at, note=event.note)
            if event.media:
                changes["media"] = state.media + _media(event.media, "resolve", event.by, event.task_id)
            if state.task(event.task_id).role == "lead":
                changes["status"] = "resolved"
        case ev.TaskSuperseded():
            changes["tasks"] = _set_task(state, event.task_id, status="superseded")
        case ev.ReviewWarned():
            changes["review_warned"] = True
        case ev.ReviewBreached():
            changes.update(review_warned=True, review_breached=True)
        case ev.SlaWarned():
            warned = state.task(event.task_id).warned | {event.clock}
            changes["tasks"] = _set_task(state, event.task_id, warned=warned)
        case ev.SlaBreached():
            breached = state.task(event.task_id).breached | {event.clock}
            changes["tasks"] = _set_task(state, event.task_id, breached=breached)
        case ev.IssueEscalated():
            changes["escalations"] = state.escalations + 1
        case ev.ExtensionRequested():
            changes["tasks"] = _set_task(state, event.task_id, extension_requested=event.extension)
        case ev.ExtensionApproved():
            changes["granted"] = state.granted + (event.resolve_due - state.task(event.task_id).resolve_due)
            changes["tasks"] = _set_task(state, event.task_id, resolve_due=event.resolve_due,
                                         resolve_warn=event.resolve_warn, extension_requested=None, extended=True,
                                         extensions=state.task(event.task_id).extensions + 1)
        case ev.IssueVerified():
            if event.media:
                changes["media"] = state.media + _media(event.media, "verify", event.by)
            if not event.passed:
                changes["failed_verifications"] = state.failed_verifications + 1
        case ev.IssueReopened():
            changes.update(status="reopened", reopen_count=event.reopen_count, tasks=_superseded(state.tasks))
        case ev.IssueClosed():
            changes.update(status="closed", closed_at=event.closed_at, closed_on_time=event.on_time,
                           tasks=_superseded(state.tasks))
        case ev.FeedbackRecorded():
            if not state.resident_feedback:  # the resident's own answer stands
                changes["satisfaction"] = event.satisfaction
        case ev.ResidentFeedbackRecorded():
            changes.update(satisfaction=event.satisfaction, resident_feedback=True)
        case ev.IssueUrged():
            urged = state.lead if event.task_id is None else state.task(event.task_id)
            if urged is not None:
                changes["tasks"] = _set_task(state, urged.id, urges=urged.urges + 1)
        case ev.SupervisionOrdered():
            changes["tasks"] = _set_task(state, event.task_id, supervised_at=event.at, supervised_due=event.due,
                                         supervision_every=event.remind_every, supervision_reminded=None)
        case ev.SupervisionReminded():
            changes["tasks"] = _set_task(state, event.task_id, supervision_reminded=event.at)
        case ev.IssueTextShredded():
            changes["text_shredded_at"] = event.at
        case ev.CommentAdded():
            changes["comments"] = state.comments + 1
            if event.kind == "progress":
                changes["last_progress_at"] = event.at
                if event.task_id is not None:
                    changes["tasks"] = _set_task(state, event.task_id, progress_at=event.at)
        case ev.ClocksPaused():
            changes["tasks"] = _set_task(state, event.task_id, info_paused_at=event.at)
        case ev.ClocksResumed():
            t = state.task(event.task_id)
            changes["granted"] = state.granted + max(timedelta(0), event.resolve_due - t.resolve_due)
            changes["tasks"] = _set_task(state, event.task_id, info_paused_at=None,
                                         acknowledge_due=event.acknowledge_due, resolve_due=event.resolve_due,
                                         acknowledge_warn=event.acknowledge_warn, resolve_warn=event.resolve_warn)
        case ev.ProgressMissed():
            changes["tasks"] = _set_task(state, event.task_id, progress_missed=event.due)
        case ev.ReturnRequested():
            changes["tasks"] = _set_task(state, event.task_id, return_requested=event.reason)
        case ev.ReturnRejected():
            t = state.task(event.task_id)
            changes["tasks"] = _set_task(state, event.task_id, return_requested=None,
                                         return_rejections=t.return_rejections + 1)
        case ev.ReturnApproved():
            t = state.task(event.task_id)
            changes["tasks"] = _set_task(state, event.task_id, status="returned", returned_at=event.at,
                                         return_reason=t.return_requested or event.reason, return_requested=None,
                                         reassigned_to=event.to_task_id)
        case ev.TaskReassigned():
            changes["tasks"] = _set_task(state, event.task_id, reassigned_to=event.to_task_id)
        case ev.ExtensionRejected():
            changes["tasks"] = _set_task(state, event.task_id, extension_requested=None)
        case ev.SuspensionRequested():
            changes["tasks"] = _set_task(state, event.task_id, suspension_requested=event.until,
                                         suspension_reason=event.reason)
        case ev.SuspensionApproved():
            t = state.task(event.task_id)
            changes["tasks"] = _set_task(state, event.task_id, suspension_requested=None, suspended_at=event.at,
                                         suspended_until=event.until, suspensions=t.suspensions + 1,
                                         warned=t.warned - {"suspension"})
        case ev.SuspensionRejected():
            changes["tasks"] = _set_task(state, event.task_id, suspension_requested=None, suspension_reason=None)
        case ev.SuspensionReviewDue():
            t = state.task(event.task_id)
            changes["tasks"] = _set_task(state, event.task_id, warned=t.warned | {"suspension"})
        case ev.TaskResumed():
            t = state.task(event.task_id)
            paused = event.at - t.suspended_at if t.suspended_at is not None else timedelta(0)
            changes["granted"] = state.granted + max(timedelta(0), event.resolve_due - t.resolve_due)
            changes["tasks"] = _set_task(state, event.task_id, suspended_at=None, suspended_until=None,
                                         suspended_for=t.suspended_for + paused,
                                         acknowledge_due=event.acknowledge_due, resolve_due=event.resolve_due,
                                         acknowledge_warn=event.acknowledge_warn, resolve_warn=event.resolve_warn)
    return _issue_with(state, **changes)


def fold(issue_id: str, events: list[tuple[ev.Event, int]]) -> IssueState:
    state = initial_state(issue_id)
    for event, seq in events:
        state = evolve(state, event, seq)
    return state


def _require_open(state: IssueState) -> None:
    if not state.exists:
        raise NotFound(f"issue {state.id} not found", field="id")
    if state.status in ISSUE_ENDED:
        raise Conflict(f"issue {state.id} is {state.status}", current_status=state.status)


def _require_untouched(state: IssueState, ended: str | None = None) -> bool:
    """Triage is possible while no task has been acknowledged. True when the issue already ended as
    ``ended`` (a retry of the same decision: nothing more to record)."""
    if not state.exists:
        raise NotFound(f"issue {state.id} not found", field="id")
    if ended is not None and state.status == ended:
        return True
    if state.status in ISSUE_ENDED:
        raise Conflict(f"issue {state.id} is {state.status}", current_status=state.status)
    if any(t.acknowledged_at is not None for t in state.tasks):
        raise Conflict(f"a task of issue {state.id} was acknowledged: it can no longer be triaged",
                       current_status=state.status)
    return False


def decide(state: IssueState, command: cmd.Command, now: datetime) -> list[ev.Event]:
    """What happens when ``command`` meets ``state`` at ``now``. Raises a DomainError when it may not."""
    match command:
        case cmd.ReportIssue():
            if state.exists:
                raise Conflict(f"issue {state.id} already exists", current_status=state.status)
            require_photo(command.report_rule, command.media, "before")
            review = command.review and not command.resolved_on_site
            review_due = review_warn = None
            if review and command.review_within is not None:  # natural clock: now + review, warned at warn_at
                review_due = now + command.review_within
                review_warn = now + timedelta(seconds=round(command.review_within.total_seconds() * command.warn_at))
            reported = ev.IssueReported(
                grid=command.grid, category=command.category, title=command.title, description=command.description,
                urgency=command.urgency, risk=command.risk, location=command.location, reporter=command.reporter,
                reported_at=now, request_hash=command.request_hash, campaign=command.campaign,
                resident=command.resident, visit=command.visit, households_target=command.households_target,
                media=command.media, media_url=command.media_url,
                resolved_on_site=command.resolved_on_site, review=review, review_due=review_due,
                review_warn=review_warn, description_public=command.description_public,
            )
            if not command.resolved_on_site:
                return [reported]
            # 即报即处: reported, handled on the spot and closed in one append, so the router never sees an
            # open issue to dispatch; the photos of the report are the on-site evidence
            require_photo(command.resolve_rule, command.media, "after")
            return [reported, ev.IssueResolvedOnSite(by=command.reporter, note=command.note),
                    ev.IssueClosed(reason="resolved_on_site", on_time=True, closed_at=now)]
        case cmd.AcceptIssue():
            _require_untouched(state)
            if state.status != "pending_review":  # accepted already (a retry), or never held: nothing to do
                return []
            return [ev.IssueAccepted(by=command.by, reason=command.reason)]
        case cmd.RejectIssue():
            if _require_untouched(state, ended="rejected"):
                return []
            return [ev.IssueRejected(by=command.by, reason=command.reason)]
        case cmd.VoidIssue():
            if _require_untouched(state, ended="voided"):
                return []
            return [ev.IssueVoided(by=command.by, reason=command.reason)]
        case cmd.RecategoriseIssue():
            _require_untouched(state)
            if (command.category, command.grid) == (state.category, state.grid):  # a retry, or no change
                return []
            return [ev.IssueRecategorised(by=command.by, reason=command.reason, from_category=state.category,
                                          to_category=command.category, from_grid=state.grid, to_grid=command.grid)]
        case cmd.MergeIssue():
            if command.into == state.id:
                raise Invalid("an issue cannot be merged into itself", field="into")
            if state.status == "merged" and state.merged_into == command.into:
                return []  # a retry
            _require_untouched(state)
            return [ev.IssueMerged(by=command.by, into=command.into, reason=command.reason)]
        case cmd.ResolveOnSite():
            _require_open(state)
            if state.tasks:
                raise Conflict("issue already dispatched to departments; verify their work instead",
                               current_status=state.status)
            require_photo(command.resolve_rule, (*command.media, *(m for m in state.media if m.stage == "report")),
                          "after")
            return [ev.IssueResolvedOnSite(by=command.by, note=command.note, media=command.media),
                    ev.IssueClosed(reason="resolved_on_site", on_time=True, closed_at=now)]
        case cmd.AcknowledgeTask():
            _require_open(state)
            t = state.task(command.task_id)
            if t.status != "dispatched":
                raise Conflict(f"task {t.id} is {t.status}, not dispatched", current_status=t.status)
            return [ev.TaskAcknowledged(task_id=t.id, by=command.by, at=now)]
        case cmd.ReturnTask():
            _require_open(state)
            t = state.task(command.task_id)
            if not t.open:
                raise Conflict(f"task {t.id} is {t.status}", current_status=t.status)
            return [ev.TaskReturned(task_id=t.id, by=command.by, reason=command.reason, at=now)]
        case cmd.ResolveTask():
            _require_open(state)
            t = state.task(command.task_id)
            if not t.open:
                raise Conflict(f"task {t.id} is {t.status}", current_status=t.status)
            require_photo(command.resolve_rule, command.media, "after")
            return [ev.TaskResolved(task_id=t.id, by=command.by, note=command.note, at=now, media=command.media),
                    *_supervision_closed(t, now)]
        case cmd.VerifyIssue():
            _require_open(state)
            if state.status != "resolved":
                raise Conflict(f"issue {state.id} is {state.status}; only a resolved issue can be verified",
                               current_status=state.status)
            verified = ev.IssueVerified(passed=command.passed, by=command.by, note=command.note, media=command.media)
            if command.passed:
                return [verified, ev.IssueClosed(reason="verified", on_time=closes_on_time(state, now),
                                                 closed_at=now)]
            return [verified, ev.IssueReopened(reason=command.note, reopen_count=state.reopen_count + 1)]
        case cmd.RecordFeedback():
            if not state.exists:
                raise NotFound(f"issue {state.id} not found", field="id")
            if state.status not in ("resolved", "closed"):
                raise Conflict("feedback is recorded once the issue is resolved", current_status=state.status)
            return [ev.FeedbackRecorded(satisfaction=command.satisfaction, by=command.by, note=command.note)]
        case cmd.RecordResidentFeedback():
            if not state.exists:
                raise NotFound(f"issue {state.id} not found", field="id")
            if state.resident_feedback:
                raise Conflict("the resident already answered", current_status=state.status)
            if state.status not in ("resolved", "closed"):
                raise Conflict("feedback is recorded once the issue is resolved", current_status=state.status)
            return [ev.ResidentFeedbackRecorded(solved=command.solved, satisfaction=command.satisfaction,
                                                comment=command.comment, at=now)]
        case cmd.EscalateIssue():
            _require_open(state)
            if state.level is None:
                raise Conflict("issue not routed yet", current_status=state.status)
            if command.to_level is None:
                raise Conflict(f"issue {state.id} is already at the city level", current_status=state.status)
            return [ev.IssueEscalated(from_level=state.level, to_level=command.to_level, cause="requested",
                                      reason=command.reason, by=command.by)]
        case cmd.RequestExtension():
            _require_open(state)
            t = state.task(command.task_id)
            if not t.open:
                raise Conflict(f"task {t.id} is {t.status}", current_status=t.status)
            if command.extension <= timedelta(0):
                raise Invalid("extension must be positive", field="extension")
            _check_cap("extension", command.extension, t.extensions, command.max, command.max_count)
            return [ev.ExtensionRequested(task_id=t.id, by=command.by, extension=command.extension,
                                          reason=command.reason)]
        case cmd.ApproveExtension():
            _require_open(state)
            t = state.task(command.task_id)
            if not t.open or t.extension_requested is None:
                raise Conflict(f"task {t.id} has no pending extension request", current_status=t.status)
            _check_cap("extension", None, t.extensions, None, command.max_count)
            return [ev.ExtensionApproved(task_id=t.id, by=command.by, resolve_due=command.resolve_due,
                                         resolve_warn=command.resolve_warn)]
        case cmd.UrgeIssue():
            _require_open(state)
            if command.task_id is None:
                return [ev.IssueUrged(by=command.by, note=command.note)]
            try:
                t = state.task(command.task_id)
            except NotFound:
                raise NotFound(f"task {command.task_id} is not a task of issue {state.id}", field="task") from None
            if not t.open:
                raise Conflict(f"task {t.id} is {t.status}: only an open task is urged", current_status=t.status)
            return [ev.IssueUrged(by=command.by, note=command.note, task_id=t.id)]
        case cmd.RequestReturn():
            t = _open_task(state, command.task_id)
            if t.return_requested is not None:
                raise Conflict(f"task {t.id} already awaits the command centre's review of its return",
                               current_status=t.status)
            return [ev.ReturnRequested(task_id=t.id, by=command.by, reason=command.reason, at=now)]
        case cmd.RejectReturn():
            t = _open_task(state, command.task_id)
            _require_return_requested(t)
            return [ev.ReturnRejected(task_id=t.id, by=command.by, reason=command.reason)]
        case cmd.ApproveReturn():
            t = _open_task(state, command.task_id)
            _require_return_requested(t)
            if command.to is None:
                return [ev.ReturnApproved(task_id=t.id, by=command.by, reason=command.reason, at=now)]
            new = _new_task(state, t, command.to, now)
            return [new, ev.ReturnApproved(task_id=t.id, by=command.by, reason=command.reason,
                                           to_department=new.department, to_task_id=new.task_id, at=now)]
        case cmd.ReassignTask():
            t = _open_task(state, command.task_id)
            if command.to.department == t.department:
                raise Invalid(f"task {t.id} is already with {t.department}", field="department")
            new = _new_task(state, t, command.to, now)
            return [ev.TaskSuperseded(task_id=t.id, reason=f"reassigned to {new.department}: {command.reason}"),
                    new,
                    ev.TaskReassigned(task_id=t.id, to_task_id=new.task_id, from_department=t.department,
                                      to_department=new.department, by=command.by, reason=command.reason,
                                      clocks="continue" if command.clocks == "continue" else "restart")]
        case cmd.RejectExtension():
            t = _open_task(state, command.task_id)
            if t.extension_requested is None:
                raise Conflict(f"task {t.id} has no pending extension request", current_status=t.status)
            return [ev.ExtensionRejected(task_id=t.id, by=command.by, reason=command.reason)]
        case cmd.RequestSuspension():
            t = _open_task(state, command.task_id)
            if t.role != "lead":
                raise Conflict(f"task {t.id} is a co-handler's; the lead asks for a suspension",
                               current_status=t.status)
            if t.suspended or t.suspension_requested is not None:
                raise Conflict(f"task {t.id} is already suspended or awaits a decision", current_status=t.status)
            if command.until <= now:
                raise Invalid("until must be in the future", field="until")
            _check_cap("suspension", command.until - now, t.suspensions, command.max, command.max_count)
            return [ev.SuspensionRequested(task_id=t.id, by=command.by, reason=command.reason, until=command.until)]
        case cmd.ApproveSuspension():
            t = _open_task(state, command.task_id)
            if t.suspension_requested is None:
                raise Conflict(f"task {t.id} has no pending suspension request", current_status=t.status)
            if t.suspension_requested <= now:
                raise Conflict(f"the review date asked for task {t.id} has passed; ask again",
                               current_status=t.status)
            if t.info_paused_at is not None:
                raise Conflict(f"task {t.id}'s clocks are held for the grid worker's reply (info_request); "
                               "decide once it came", current_status=t.status)
            _check_cap("suspension", t.suspension_requested - now, t.suspensions, command.max, command.max_count)
            return [ev.SuspensionApproved(task_id=t.id, by=command.by, until=t.suspension_requested, at=now)]
        case cmd.RejectSuspension():
            t = _open_task(state, command.task_id)
            if t.suspension_requested is None:
                raise Conflict(f"task {t.id} has no pending suspension request", current_status=t.status)
            return [ev.SuspensionRejected(task_id=t.id, by=command.by, reason=command.reason)]
        case cmd.ResumeTask():
            t = _open_task(state, command.task_id)
            if not t.suspended:
                raise Conflict(f"task {t.id} is not suspended", current_status=t.status)
            return [ev.TaskResumed(task_id=t.id, by=command.by, at=now, acknowledge_due=command.acknowledge_due,
                                   resolve_due=command.resolve_due, acknowledge_warn=command.acknowledge_warn,
                                   resolve_warn=command.resolve_warn)]
        case cmd.SuperviseTask():
            t = _open_task(state, command.task_id)
            if command.due <= now:
                raise Invalid("due must be in the future", field="due")
            if command.remind_every <= timedelta(0):
                raise Invalid("remind_every must be positive", field="remind_every")
            return [ev.SupervisionOrdered(task_id=t.id, by=command.by, due=command.due, reason=command.reason,
                                          remind_every=command.remind_every, at=now)]
        case cmd.ShredText():
            if not state.exists:
                raise NotFound(f"issue {state.id} not found", field="id")
            if command.reason == "retention":
                if state.status != "closed" or state.closed_at is None:
                    raise Conflict(f"issue {state.id} is not closed: retention keeps its text",
                                   current_status=state.status)
                if command.retention is not None and state.closed_at + command.retention > now:
                    raise Conflict(f"issue {state.id} was closed less than the retention period ago",
                                   current_status=state.status)
            return [ev.IssueTextShredded(by=command.by, reason=command.reason,  # type: ignore[arg-type]
                                         key_id=command.key_id, closed_at=state.closed_at, at=now)]
        case cmd.SetDescriptionPublication():
            if not state.exists:
                raise NotFound(f"issue {state.id} not found", field="id")
            if state.description_public == command.public:  # already so (a retry, or the reporter's own mark)
                return []
            return [ev.DescriptionPublicationChanged(public=command.public, by=command.by, reason=command.reason)]
        case cmd.AddComment():
            if not state.exists:
                raise NotFound(f"issue {state.id} not found", field="id")
            if command.kind == "progress":  # 阶段性答复: the lead's department, on its open task
                lead = state.lead
                if lead is None or not lead.open or lead.department != command.department:
                    raise Conflict("a progress report comes from the department holding the open lead task",
                                   current_status=state.status)
                task_id: str | None = lead.id
            else:
                task_id = command.task_id
                if task_id is not None:
                    state.task(task_id)
            comment = ev.CommentAdded(by=command.by, role=command.role, department=command.department,
                                      kind=command.kind, text=command.text, task_id=task_id,  # type: ignore[arg-type]
                                      media=command.media, at=now)
            return [comment, *_info_pause(state, command, now)]
    raise TypeError(f"unknown command {command!r}")  # pragma: no cover


def closes_on_time(state: IssueState, closed_at: datetime) -> bool:
    """按期结案, from the first dispatch: the lead's resolution that the verification accepts (the work's end; the
    grid worker's verification time does not count against the departments, ``closed_at`` when there is none) by
    the first dispatch's resolve due time plus what approved extensions and suspensions added
    (``first_resolve_due + granted``), whichever departments and levels held the issue meanwhile."""
    if state.first_resolve_due is None:
        return True
    lead = state.lead
    done = lead.resolved_at if lead is not None and lead.resolved_at is not None else closed_at
    return done <= state.first_resolve_due + state.granted


def _info_pause(state: IssueState, command: cmd.AddComment, now: datetime) -> list[ev.Event]:
    """补充材料 (rulebook ``info_request: {pauses: true}``, ``command.pauses``): an ``info_request`` from the
    department holding the open lead task pauses its clocks, unless they are already held (缓办 or an earlier
    request); the grid worker's ``info_reply`` resumes them with the time that was left (``command.resume``, the
    moved clocks). Any other comment changes no clock."""
    lead = state.lead
    if lead is None or not lead.open or state.status in ISSUE_ENDED:
        return []
    if (command.kind == "info_request" and command.pauses and command.department == lead.department
            and not lead.suspended and lead.info_paused_at is None):
        return [ev.ClocksPaused(task_id=lead.id, at=now)]
    if command.kind == "info_reply" and command.role == "grid_worker" and lead.info_paused_at is not None:
        if command.resume is None or command.resume.task_id != lead.id:
            raise Conflict(f"task {lead.id}'s clocks cannot be resumed from this state; retry",
                           current_status=lead.status)
        r = command.resume
        return [ev.ClocksResumed(task_id=lead.id, at=now, acknowledge_due=r.acknowledge_due,
                                 resolve_due=r.resolve_due, acknowledge_warn=r.acknowledge_warn,
                                 resolve_warn=r.resolve_warn)]
    return []


def _supervision_closed(t: TaskState, now: datetime) -> list[ev.Event]:
    """督办 ends with the task's resolution: on time when resolved by the supervision's due date."""
    if t.supervised_due is None:
        return []
    return [ev.SupervisionClosed(task_id=t.id, due=t.supervised_due, on_time=now <= t.supervised_due, at=now)]


def _open_task(state: IssueState, task_id: str) -> TaskState:
    _require_open(state)
    t = state.task(task_id)
    if not t.open:
        raise Conflict(f"task {t.id} is {t.status}", current_status=t.status)
    return t


def _require_return_requested(t: TaskState) -> None:
    if t.return_requested is None:
        raise Conflict(f"task {t.id} has no return awaiting review", current_status=t.status)


def _check_cap(what: str, length: timedelta | None, count: int, cap: timedelta | None, max_count: int | None) -> None:
    """A rulebook cap (``extension`` or ``suspension``): 409 naming the cap that would be passed."""
    if max_count is not None and count >= max_count:
        raise Conflict(f"rulebook cap {what}.max_count: {count} {what}s already approved for this task "
                       f"(at most {max_count})", current_status="capped")
    if cap is not None and length is not None and length > cap:
        raise Conflict(f"rulebook cap {what}.max: {length} asked, at most {cap}", current_status="capped")


def _new_task(state: IssueState, old: TaskState, to: cmd.NewTask, now: datetime) -> ev.TaskDispatched:
    """The task that takes ``old`` over (改派): same role and level, the caller's department and deadlines."""
    return ev.TaskDispatched(
        task_id=ids.task_id(state.id, len(state.tasks) + 1), department=to.department, role=old.role,  # type: ignore[arg-type]
        level=old.level, clock=old.clock, dispatched_at=now,  # type: ignore[arg-type]
        acknowledge_due=to.acknowledge_due, resolve_due=to.resolve_due,
        acknowledge_warn=to.acknowledge_warn, resolve_warn=to.resolve_warn)
