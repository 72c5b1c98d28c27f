"""Commands: what an actor asks the issue aggregate to do (imperative names)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.events.models import Location, MediaRef, ResidentRef, Satisfaction, Urgency


@dataclass(frozen=True, slots=True)
class ReportIssue:
    grid: str
    category: str
    title: str
    reporter: str
    description: str | None = None
    urgency: Urgency = "normal"
    risk: tuple[str, ...] = ()
    location: Location | None = None
    request_hash: str | None = None
    campaign: str | None = None
    resident: ResidentRef | None = None  # already sealed by the caller (the core never sees clear data)
    visit: str | None = None  # the household visit the report came from
    households_target: int | None = None  # a campaign's issue: households of the grid to reach
    media: tuple[MediaRef, ...] = ()
    media_url: str | None = None
    review: bool = False  # 受理: the category's intake is review (wait in pending_review)
    review_within: timedelta | None = None  # the review clock (rulebook sla.review), if any
    warn_at: float = 0.8  # the fraction of the review clock elapsed when it warns
    resolved_on_site: bool = False  # 即报即处: handled on the spot by the reporter; nothing is dispatched
    note: str | None = None  # what was done on the spot
    report_rule: str | None = None  # the evidence rule a report must meet (a photo, phase before), if any
    resolve_rule: str | None = None  # the evidence rule a resolve must meet (a photo, phase after), if any
    description_public: bool = False  # the reporter marks the description public (anonymous Open311 reads)


@dataclass(frozen=True, slots=True)
class ResolveOnSite:
    by: str
    note: str | None = None
    media: tuple[MediaRef, ...] = ()
    resolve_rule: str | None = None


@dataclass(frozen=True, slots=True)
class AcceptIssue:
    by: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class RejectIssue:
    by: str
    reason: str


@dataclass(frozen=True, slots=True)
class VoidIssue:
    by: str
    reason: str


@dataclass(frozen=True, slots=True)
class RecategoriseIssue:
    by: str
    reason: str
    category: str
    grid: str


@dataclass(frozen=True, slots=True)
class MergeIssue:
    """合并办理: handle this issue with ``into`` (an open issue, checked by the caller)."""

    by: str
    into: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class AcknowledgeTask:
    task_id: str
    by: str


@dataclass(frozen=True, slots=True)
class ReturnTask:
    task_id: str
    by: str
    reason: str


@dataclass(frozen=True, slots=True)
class ResolveTask:
    task_id: str
    by: str
    note: str | None = None
    media: tuple[MediaRef, ...] = ()
    resolve_rule: str | None = None


@dataclass(frozen=True, slots=True)
class VerifyIssue:
    passed: bool
    by: str
    note: str | None = None
    media: tuple[MediaRef, ...] = ()


@dataclass(frozen=True, slots=True)
class RecordFeedback:
    satisfaction: Satisfaction
    by: str
    note: str | None = None


@dataclass(frozen=True, slots=True)
class RecordResidentFeedback:
    """The resident's own 回访 (one-time link): once per issue, after it is resolved."""

    solved: bool
    satisfaction: Satisfaction
    comment: str | None = None


@dataclass(frozen=True, slots=True)
class EscalateIssue:
    by: str
    reason: str
    to_level: str | None  # computed by the caller from the org tree; None at the city


@dataclass(frozen=True, slots=True)
class RequestExtension:
    task_id: str
    by: str
    extension: timedelta
    reason: str
    max: timedelta | None = None  # the rulebook's extension cap (each extension at most ``max``)
    max_count: int | None = None  # at most this many approved per task


@dataclass(frozen=True, slots=True)
class ApproveExtension:
    task_id: str
    by: str
    resolve_due: datetime
    resolve_warn: datetime
    max_count: int | None = None


@dataclass(frozen=True, slots=True)
class NewTask:
    """A task the caller planned (改派): its department and deadlines, computed from the org and rulebook."""

    department: str
    acknowledge_due: datetime
    resolve_due: datetime
    acknowledge_warn: datetime
    resolve_warn: datetime


@dataclass(frozen=True, slots=True)
class RequestReturn:
    task_id: str
    by: str
    reason: str


@dataclass(frozen=True, slots=True)
class RejectReturn:
    task_id: str
    by: str
    reason: str


@dataclass(frozen=True, slots=True)
class ApproveReturn:
    task_id: str
    by: str
    reason: str | None = None
    to: NewTask | None = None  # None: a lead's return escalates (the router), a co-handler's just ends


@dataclass(frozen=True, slots=True)
class ReassignTask:
    task_id: str
    by: str
    reason: str
    to: NewTask
    clocks: str = "restart"


@dataclass(frozen=True, slots=True)
class RejectExtension:
    task_id: str
    by: str
    reason: str


@dataclass(frozen=True, slots=True)
class RequestSuspension:
    task_id: str
    by: str
    reason: str
    until: datetime
    max: timedelta | None = None  # the rulebook's suspension cap
    max_count: int | None = None


@dataclass(frozen=True, slots=True)
class ApproveSuspension:
    task_id: str
    by: str
    max: timedelta | None = None
    max_count: int | None = None


@dataclass(frozen=True, slots=True)
class RejectSuspension:
    task_id: str
    by: str
    reason: str


@dataclass(frozen=True, slots=True)
class ResumeTask:
    task_id: str
    by: str
    acknowledge_due: datetime  # the clocks moved by the pause (``SlaClocks.resume``)
    resolve_due: datetime
    acknowledge_warn: datetime
    resolve_warn: datetime


@dataclass(frozen=True, slots=True)
class MovedClocks:
    """A task's clocks after a pause (``SlaClocks.resume``): what the reply to an info request resumes."""

    task_id: str
    acknowledge_due: datetime
    resolve_due: datetime
    acknowledge_warn: datetime
    resolve_warn: datetime


@dataclass(frozen=True, slots=True)
class AddComment:
    by: str
    role: str
    text: str
    kind: str = "comment"
    department: str | None = None
    task_id: str | None = None
    media: tuple[str, ...] = ()
    pauses: bool = False  # the rulebook's info_request.pauses for the issue's category
    resume: MovedClocks | None = None  # an info_reply: the lead's clocks moved by the info pause, if any


@dataclass(frozen=True, slots=True)
class SuperviseTask:
    task_id: str
    by: str
    due: datetime
    reason: str
    remind_every: timedelta


@dataclass(frozen=True, slots=True)
class UrgeIssue:
    by: str
    note: str | None = None
    task_id: str | None = None  # the task urged; None: the lead task holding the issue


@dataclass(frozen=True, slots=True)
class ShredText:
    """Destroy the issue's free text (crypto-shredding): the retention policy, or by hand. ``key_id``: the key
    that was destroyed (the caller destroys it first, then records this)."""
    by: str
    reason: str  # retention | requested
    key_id: str | None
    retention: timedelta | None = None  # retention: only an issue closed at least this long ago


@dataclass(frozen=True, slots=True)
class SetDescriptionPublication:
    """Publish (``public``) or withdraw the issue's description in anonymous reads (a moderator's decision)."""

    by: str
    public: bool
    reason: str | None = None


Command = (
    ReportIssue | ResolveOnSite | AcceptIssue | RejectIssue | VoidIssue | RecategoriseIssue | MergeIssue
    | AcknowledgeTask | ReturnTask | ResolveTask | VerifyIssue | RecordFeedback
    | RecordResidentFeedback | EscalateIssue | RequestExtension | ApproveExtension | UrgeIssue
    | RequestReturn | RejectReturn | ApproveReturn | ReassignTask | RejectExtension
    | RequestSuspension | ApproveSuspension | RejectSuspension | ResumeTask | AddComment
    | SuperviseTask | ShredText | SetDescriptionPublication
)
