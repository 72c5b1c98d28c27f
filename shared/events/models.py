"""Every fact needle records, as frozen pydantic models (past tense, one class per type).

Each class names its subject token (``name``), its CloudEvents ``type`` and its schema
version. A change to a model's JSON schema needs a version bump (and an upcaster in
``codec.py`` when old events must still be read).
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

Urgency = Literal["normal", "urgent", "emergency"]
TaskRole = Literal["lead", "co"]
Clock = Literal["acknowledge", "resolve"]
ClockKind = Literal["natural", "working"]
Satisfaction = Literal["satisfied", "basically_satisfied", "dissatisfied"]
RouteReason = Literal["reported", "escalated", "reopened", "returned", "risk"]
EscalationCause = Literal["acknowledge_breach", "resolve_breach", "return", "verification_failed_twice", "requested"]


class Location(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    address: str | None = Field(default=None, max_length=500)


RESIDENT_ID = r"^[A-Za-z0-9_-]{1,64}$"
MEDIA_ID = r"^[0-9a-f]{64}$"
MediaPhase = Literal["before", "after", "other"]


class MediaRef(BaseModel):
    """A photo kept in the media store (``GET /v1/media/{id}``), referenced by its content address: events
    carry references only, never the bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str = Field(pattern=MEDIA_ID, description="the medium's id: the sha256 (hex) of the stored bytes")
    phase: MediaPhase = Field(description="before the work (the report), after it (the fix), or other")


class ResidentRef(BaseModel):
    """A resident as the event stream holds one: an id and, sealed with that resident's own key (kept
    outside the stream), their name and phone. Never the clear values. Once the key is destroyed
    (``needle forget``) the ciphertext can never be read again."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str = Field(pattern=RESIDENT_ID, description="the resident's id (one data key per resident)")
    key_id: str | None = Field(default=None, description="which of the resident's keys sealed the data")
    ciphertext: str | None = Field(default=None, description="AES-256-GCM of {name, phone}, base64")
    nonce: str | None = Field(default=None, description="the GCM nonce, base64")


class Event(BaseModel):
    """Base of every event payload (the CloudEvent ``data``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: ClassVar[str]
    ce_type: ClassVar[str]
    version: ClassVar[int] = 1


class IssueReported(Event):
    name = "issue_reported"
    ce_type = "needle.issue.reported.v1"
    grid: str
    category: str
    title: str
    description: str | None = None
    urgency: Urgency = "normal"
    risk: tuple[str, ...] = ()
    location: Location | None = None
    reporter: str
    reported_at: datetime
    request_hash: str | None = None
    campaign: str | None = None
    resident: ResidentRef | None = None
    visit: str | None = Field(default=None, description="the household visit (走访) the report came from")
    households_target: int | None = Field(
        default=None, ge=0, description="a campaign's issue: the households of its grid the campaign must reach")

    media: tuple[MediaRef, ...] = ()
    media_url: str | None = Field(default=None, description="an external link given with the report (Open311 "
                                                            "media_url); never fetched by needle")
    review: bool = Field(default=False, description="受理: the category's intake is review; the issue waits in "
                                                    "pending_review until accepted, rejected, voided or "
                                                    "recategorised, and nothing is dispatched before")
    review_due: datetime | None = Field(default=None, description="the review clock (rulebook sla.review): when a "
                                                                  "report still pending_review is breached")
    review_warn: datetime | None = Field(default=None, description="when a report still pending_review is warned")
    resolved_on_site: bool = Field(default=False, description="即报即处: handled on the spot by the reporter; "
                                                              "resolved_on_site and closed follow in the same "
                                                              "append, and nothing is ever dispatched")
    description_public: bool = Field(default=False, description="the reporter marked the description public: "
                                                                "anonymous Open311 reads show it (until a "
                                                                "moderator withdraws it: "
                                                                "description_publication_changed)")


VisitKind = Literal["routine", "campaign", "follow_up"]


class VisitRecorded(Event):
    """走访: a grid's service team visited one household. The household is kept only as a keyed hash (HMAC,
    the key outside the stream) of its key in the grid's register: distinct households can be counted, the
    door number cannot be read back."""

    name = "visit_recorded"
    ce_type = "needle.visit.recorded.v1"
    grid: str
    household: str = Field(description="HMAC-SHA256 of the household's key in the grid's register (hex)")
    kind: VisitKind
    campaign: str | None = None
    visited_at: datetime
    by: str
    note: str | None = None
    issues: tuple[str, ...] = Field(default=(), description="issues already reported that the visit raised")
    request_hash: str | None = None


class IssueResolvedOnSite(Event):
    name = "issue_resolved_on_site"
    ce_type = "needle.issue.resolved_on_site.v1"
    by: str
    note: str | None = None
    media: tuple[MediaRef, ...] = ()


class IssueAccepted(Event):
    """受理: the command centre (or a supervisor) accepts a report waiting for review; the router dispatches
    it by the rules."""

    name = "issue_accepted"
    ce_type = "needle.issue.accepted.v1"
    by: str
    reason: str | None = None


class IssueRejected(Event):
    """不予受理: not government business, out of jurisdiction...; the grid worker sees why. Open tasks end."""

    name = "issue_rejected"
    ce_type = "needle.issue.rejected.v1"
    by: str
    reason: str


class IssueVoided(Event):
    """作废: a mistake or a test. Open tasks end."""

    name = "issue_voided"
    ce_type = "needle.issue.voided.v1"
    by: str
    reason: str


class IssueRecategorised(Event):
    """改类: another category and/or grid; open tasks end and the router routes the issue anew, with new
    clocks."""

    name = "issue_recategorised"
    ce_type = "needle.issue.recategorised.v1"
    by: str
    reason: str
    from_category: str
    to_category: str
    from_grid: str
    to_grid: str


class IssueMerged(Event):
    """合并办理: a duplicate is merged into another open issue (``into``); its open tasks end and it is handled
    with the target: closing the target closes it (``issue_closed_with_target``)."""

    name = "issue_merged"
    ce_type = "needle.issue.merged.v1"
    by: str
    into: str
    reason: str | None = None


class IssueDuplicateAttached(Event):
    """The router's record, on the target, of a duplicate merged into it (so that closing it closes them)."""

    name = "issue_duplicate_attached"
    ce_type = "needle.issue.duplicate_attached.v1"
    duplicate: str
    caused_by: int = 0


class IssueClosedWithTarget(Event):
    """A merged issue closed because the issue it was merged into closed (the router's reaction)."""

    name = "issue_closed_with_target"
    ce_type = "needle.issue.closed_with_target.v1"
    into: str
    on_time: bool
    closed_at: datetime
    caused_by: int = 0


class UnservedKind(BaseModel):
    """A department kind the rulebook asks for that no department serves at the owner area or above."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: str = Field(description="the department kind the rule names")
    area: str = Field(description="the owner area nothing of that kind serves")
    role: TaskRole = Field(description="lead (the fallback took it: 兜底) or co (no co-task was dispatched)")


class IssueRouted(Event):
    """Which level and area own the issue now, and why (rule and rulebook version).

    ``urgency`` (optional; absent before it existed) is the urgency in force: the reported one raised by the
    risk flags' urgencies. ``unserved`` (optional) lists the kinds the rule names that nothing serves."""

    name = "issue_routed"
    ce_type = "needle.issue.routed.v1"
    level: str
    owner_area: str
    reason: RouteReason
    rule: str
    rulebook_version: str
    caused_by: int = 0
    urgency: Urgency | None = None
    unserved: tuple[UnservedKind, ...] = ()


class TaskDispatched(Event):
    name = "task_dispatched"
    ce_type = "needle.task.dispatched.v1"
    task_id: str
    department: str
    role: TaskRole
    level: str
    clock: ClockKind
    dispatched_at: datetime
    acknowledge_due: datetime
    resolve_due: datetime
    acknowledge_warn: datetime
    resolve_warn: datetime
    caused_by: int = 0


class TaskAcknowledged(Event):
    name = "task_acknowledged"
    ce_type = "needle.task.acknowledged.v1"
    task_id: str
    by: str
    at: datetime


class TaskReturned(Event):
    """退单: the department says the work is not theirs. The clock pauses."""

    name = "task_returned"
    ce_type = "needle.task.returned.v1"
    task_id: str
    by: str
    reason: str
    at: datetime


class TaskResolved(Event):
    name = "task_resolved"
    ce_type = "needle.task.resolved.v1"
    task_id: str
    by: str
    note: str | None = None
    at: datetime
    media: tuple[MediaRef, ...] = ()


class TaskSuperseded(Event):
    """A lower level's task closed because an upper level took the issue over."""

    name = "task_superseded"
    ce_type = "needle.task.superseded.v1"
    task_id: str
    reason: str
    caused_by: int = 0


class SlaWarned(Event):
    name = "sla_warned"
    ce_type = "needle.sla.warned.v1"
    task_id: str
    clock: Clock
    due: datetime
    caused_by: int = 0


class ReviewWarned(Event):
    """The review clock (受理, rulebook ``sla.review``) of a report still pending_review reached its warning."""

    name = "review_warned"
    ce_type = "needle.review.warned.v1"
    due: datetime
    caused_by: int = 0


class ReviewBreached(Event):
    """The review clock of a report still pending_review ran out (it stays held for the command centre)."""

    name = "review_breached"
    ce_type = "needle.review.breached.v1"
    due: datetime
    caused_by: int = 0


class SlaBreached(Event):
    name = "sla_breached"
    ce_type = "needle.sla.breached.v1"
    task_id: str
    clock: Clock
    due: datetime
    caused_by: int = 0


class IssueEscalated(Event):
    name = "issue_escalated"
    ce_type = "needle.issue.escalated.v1"
    from_level: str
    to_level: str
    cause: EscalationCause
    reason: str | None = None
    by: str | None = None
    caused_by: int = 0


class ExtensionRequested(Event):
    name = "extension_requested"
    ce_type = "needle.task.extension_requested.v1"
    task_id: str
    by: str
    extension: timedelta
    reason: str


class ExtensionApproved(Event):
    """延期: a supervisor moved the task's resolve due time."""

    name = "extension_approved"
    ce_type = "needle.task.extension_approved.v1"
    task_id: str
    by: str
    resolve_due: datetime
    resolve_warn: datetime


class IssueVerified(Event):
    name = "issue_verified"
    ce_type = "needle.issue.verified.v1"
    passed: bool
    by: str
    note: str | None = None
    media: tuple[MediaRef, ...] = ()


class IssueReopened(Event):
    """返工: verification failed; the issue goes back to the departments."""

    name = "issue_reopened"
    ce_type = "needle.issue.reopened.v1"
    reason: str | None = None
    reopen_count: int


class IssueClosed(Event):
    name = "issue_closed"
    ce_type = "needle.issue.closed.v1"
    reason: Literal["verified", "resolved_on_site"]
    on_time: bool
    closed_at: datetime


class FeedbackRecorded(Event):
    """回访 by the grid worker (by phone or in person): the resident's satisfaction as the worker heard it.
    Where the resident answers the one-time link too, their own answer counts (ResidentFeedbackRecorded)."""

    name = "feedback_recorded"
    ce_type = "needle.issue.feedback_recorded.v1"
    satisfaction: Satisfaction
    by: str
    note: str | None = None


class ResidentFeedbackRecorded(Event):
    """回访 by the resident themselves, through the one-time signed link: solved or not, satisfied or not.
    It takes precedence over the grid worker's FeedbackRecorded in 解决率 and 满意率. No name, no phone."""

    name = "resident_feedback_recorded"
    ce_type = "needle.issue.resident_feedback_recorded.v1"
    solved: bool
    satisfaction: Satisfaction
    comment: str | None = Field(default=None, max_length=1000)
    at: datetime


class IssueUrged(Event):
    """催办: a supervisor urges the holders of an issue; ``task_id`` names the task urged (counted against its
    department). Without one (as before) the urge counts against the lead task holding the issue."""

    name = "issue_urged"
    ce_type = "needle.issue.urged.v1"
    by: str
    note: str | None = None
    task_id: str | None = Field(default=None, description="the task urged (additive, optional): its department is "
                                                          "counted; absent: the lead task holding the issue")


class RulebookPublished(Event):
    """A rulebook (权责清单) took effect: new reports route by it; dispatched tasks keep their deadlines."""

    name = "rulebook_published"
    ce_type = "needle.rulebook.published.v1"
    rulebook_version: str
    source: str
    text: str = Field(description="the rulebook YAML as published")
    categories: tuple[str, ...]
    by: str


class ResidentForgotten(Event):
    """个人信息删除: the resident's data key was destroyed; their sealed name and phone are unreadable
    everywhere for good, while the facts (issues, tasks) stay. Carries no personal data."""

    name = "resident_forgotten"
    ce_type = "needle.resident.forgotten.v1"
    resident_id: str = Field(pattern=RESIDENT_ID)
    key_ids: tuple[str, ...] = Field(default=(), description="the data keys destroyed")
    by: str
    at: datetime


class ReturnRequested(Event):
    """退单申请: the department asks the command centre to take the task back (the rulebook's ``return.approval``).
    The task's clocks keep running while the centre reviews it: the department holds it until the decision."""

    name = "return_requested"
    ce_type = "needle.task.return_requested.v1"
    task_id: str
    by: str
    reason: str
    at: datetime


class ReturnRejected(Event):
    """退单驳回: the command centre refused the return; the task stays with the department."""

    name = "return_rejected"
    ce_type = "needle.task.return_rejected.v1"
    task_id: str
    by: str
    reason: str


class ReturnApproved(Event):
    """退单同意: the task is returned. ``to_department`` (改派) took it over as task ``to_task_id``; without one a
    lead's return escalates (the router reacts)."""

    name = "return_approved"
    ce_type = "needle.task.return_approved.v1"
    task_id: str
    by: str
    reason: str | None = None
    to_department: str | None = None
    to_task_id: str | None = None
    at: datetime


class TaskReassigned(Event):
    """改派: a command centre or supervisor moved an open task to another department serving the owner area;
    the old task is superseded, ``to_task_id`` is the new one. ``clocks``: restarted or continued."""

    name = "task_reassigned"
    ce_type = "needle.task.reassigned.v1"
    task_id: str
    to_task_id: str
    from_department: str
    to_department: str
    by: str
    reason: str
    clocks: Literal["restart", "continue"]


class ExtensionRejected(Event):
    """延期驳回: a supervisor refused the requested extension."""

    name = "extension_rejected"
    ce_type = "needle.task.extension_rejected.v1"
    task_id: str
    by: str
    reason: str


class SuspensionRequested(Event):
    """缓办/挂账申请: the lead asks to pause the task's clocks until ``until`` (the review date)."""

    name = "suspension_requested"
    ce_type = "needle.task.suspension_requested.v1"
    task_id: str
    by: str
    reason: str
    until: datetime


class SuspensionApproved(Event):
    """缓办: the task's clocks are paused from ``at``; the review is due at ``until``."""

    name = "suspension_approved"
    ce_type = "needle.task.suspension_approved.v1"
    task_id: str
    by: str
    until: datetime
    at: datetime


class SuspensionRejected(Event):
    name = "suspension_rejected"
    ce_type = "needle.task.suspension_rejected.v1"
    task_id: str
    by: str
    reason: str


class SuspensionReviewDue(Event):
    """The review date of a suspension came (a durable timer): the task waits to be resumed."""

    name = "suspension_review_due"
    ce_type = "needle.task.suspension_review_due.v1"
    task_id: str
    until: datetime
    caused_by: int = 0


class TaskResumed(Event):
    """The suspension ended: the clocks run again with the time that was left when they paused."""

    name = "task_resumed"
    ce_type = "needle.task.resumed.v1"
    task_id: str
    by: str
    at: datetime
    acknowledge_due: datetime
    resolve_due: datetime
    acknowledge_warn: datetime
    resolve_warn: datetime


class SupervisionOrdered(Event):
    """督办: a supervisor or the command centre above puts the task under supervision with its own ``due`` date;
    reminders come every ``remind_every`` until the task is resolved."""

    name = "supervision_ordered"
    ce_type = "needle.task.supervision_ordered.v1"
    task_id: str
    by: str
    due: datetime
    reason: str
    remind_every: timedelta
    at: datetime


class SupervisionReminded(Event):
    """A 督办 reminder (a durable timer): ``at`` is the reminder's scheduled time."""

    name = "supervision_reminded"
    ce_type = "needle.task.supervision_reminded.v1"
    task_id: str
    due: datetime
    at: datetime
    caused_by: int = 0


class SupervisionClosed(Event):
    """The supervised task was resolved: on time when by the supervision's ``due``."""

    name = "supervision_closed"
    ce_type = "needle.task.supervision_closed.v1"
    task_id: str
    due: datetime
    on_time: bool
    at: datetime


class ClocksPaused(Event):
    """补充材料: the lead's department asked the grid worker for more information (an ``info_request`` comment) and
    the rulebook's ``info_request: {pauses: true}`` holds the lead task's clocks from ``at`` until the reply."""

    name = "clocks_paused"
    ce_type = "needle.task.clocks_paused.v1"
    task_id: str
    cause: Literal["info_request"] = "info_request"
    at: datetime


class ClocksResumed(Event):
    """The grid worker's ``info_reply`` came: the clocks paused by the info request run again from ``at`` with the
    time that was left on each when they paused (the new due and warning times)."""

    name = "clocks_resumed"
    ce_type = "needle.task.clocks_resumed.v1"
    task_id: str
    cause: Literal["info_request"] = "info_request"
    at: datetime
    acknowledge_due: datetime
    resolve_due: datetime
    acknowledge_warn: datetime
    resolve_warn: datetime


class ProgressMissed(Event):
    """阶段性答复 missing: the lead task's category requires a progress report every ``progress_every`` and none came
    in the period that ended at ``due`` (a durable timer). The next period starts at ``due``."""

    name = "progress_missed"
    ce_type = "needle.task.progress_missed.v1"
    task_id: str
    due: datetime
    caused_by: int = 0


CommentKind = Literal["comment", "progress", "info_request", "info_reply"]


class IssueTextShredded(Event):
    """The issue's data key was destroyed (crypto-shredding): the free text sealed with it -- title, description,
    address, exact point, notes, reasons, comments -- can never be read again and reads ``[erased]``. Carries
    no personal data."""

    name = "issue_text_shredded"
    ce_type = "needle.issue.text_shredded.v1"
    by: str = Field(description="who shredded it: 'needle/retention' for the retention policy, else a token subject")
    reason: Literal["retention", "requested"] = Field(
        description="retention: closed longer than the rulebook's retention.closed_text_days; requested: by hand")
    key_id: str | None = Field(default=None, description="the destroyed key (None: the issue had none)")
    closed_at: datetime | None = Field(default=None, description="when the issue was closed")
    at: datetime


class CommentAdded(Event):
    """A participant's message on the issue: a comment, a lead's progress report (阶段性答复), a request for more
    information (补充材料) or its reply. ``text`` is free text: no personal data belongs in it."""

    name = "comment_added"
    ce_type = "needle.issue.comment_added.v1"
    by: str
    role: str
    department: str | None = None
    kind: CommentKind = "comment"
    text: str
    task_id: str | None = None
    media: tuple[str, ...] = Field(default=(), description="references to media already stored (URLs or ids)")
    at: datetime


class DescriptionPublicationChanged(Event):
    """A moderator (a supervisor over the issue's grid, or an admin) approved (``public: true``) or withdrew
    (``public: false``) the publication of the issue's description in anonymous Open311 reads. ``reason`` is
    never published."""

    name = "description_publication_changed"
    ce_type = "needle.issue.description_publication_changed.v1"
    public: bool
    by: str
    reason: str | None = None


EVENT_TYPES: tuple[type[Event], ...] = (
    IssueReported,
    IssueResolvedOnSite,
    IssueAccepted,
    IssueRejected,
    IssueVoided,
    IssueRecategorised,
    IssueMerged,
    IssueDuplicateAttached,
    IssueClosedWithTarget,
    IssueRouted,
    TaskDispatched,
    TaskAcknowledged,
    TaskReturned,
    TaskResolved,
    TaskSuperseded,
    SlaWarned,
    SlaBreached,
    ReviewWarned,
    ReviewBreached,
    IssueEscalated,
    ExtensionRequested,
    ExtensionApproved,
    IssueVerified,
    IssueReopened,
    IssueClosed,
    FeedbackRecorded,
    ResidentFeedbackRecorded,
    IssueUrged,
    RulebookPublished,
    ResidentForgotten,
    VisitRecorded,
    ReturnRequested,
    ReturnRejected,
    ReturnApproved,
    TaskReassigned,
    ExtensionRejected,
    SuspensionRequested,
    SuspensionApproved,
    SuspensionRejected,
    SuspensionReviewDue,
    TaskResumed,
    CommentAdded,
    ClocksPaused,
    ClocksResumed,
    ProgressMissed,
    SupervisionOrdered,
    SupervisionReminded,
    SupervisionClosed,
    IssueTextShredded,
    DescriptionPublicationChanged,
)
BY_NAME: dict[str, type[Event]] = {t.name: t for t in EVENT_TYPES}
BY_CE_TYPE: dict[str, type[Event]] = {t.ce_type: t for t in EVENT_TYPES}
