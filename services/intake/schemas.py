"""Request and response bodies of the HTTP API (unknown fields are refused)."""
from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.config import OrgTree
from shared.domain.issue import IssueState, MediaItem, TaskState
from shared.events.models import MEDIA_ID, RESIDENT_ID, Location, MediaPhase
from shared.privacy.sealing import normalize_phone

# Free text: no NUL (Postgres text cannot hold it), no other C0 control or DEL (they corrupt logs, CSV and
# terminals), no bidirectional embedding, override or isolate (U+202A-U+202E, U+2066-U+2069: "Trojan Source",
# text that reads otherwise than it is stored). TEXT keeps TAB, LF and CR (multi-line); LINE keeps none.
_BIDI = "\\u202a-\\u202e\\u2066-\\u2069"
TEXT = f"^[^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f{_BIDI}]*$"
LINE = f"^[^\\x00-\\x1f\\x7f{_BIDI}]*$"
NO_NUL = TEXT  # the name this pattern had when it refused NUL only
_LINE = re.compile(LINE)


def check_line(value: str, what: str) -> str:
    if not _LINE.fullmatch(value):
        raise ValueError(f"{what} must not contain control characters or bidirectional overrides")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ResidentBody(Strict):
    """The resident the report is about (个人信息): sealed with the resident's own key before it is
    recorded; the event stream never holds the clear name or phone."""

    id: str | None = Field(default=None, pattern=RESIDENT_ID,
                           description="the resident's id in your own register (else needle keys them by phone)")
    name: str | None = Field(default=None, min_length=1, max_length=100, pattern=LINE)
    phone: str | None = Field(default=None, max_length=32,
                              description="normalized to E.164; without a country code a Chinese number "
                                          "(mobile 1[3-9]xxxxxxxxx, landline with area code)")

    @field_validator("phone")
    @classmethod
    def _phone(cls, v: str | None) -> str | None:
        return normalize_phone(v) if v is not None else None

    @model_validator(mode="after")
    def _something(self) -> ResidentBody:
        if self.name is None and self.phone is None:
            raise ValueError("a resident needs a name or a phone")
        return self


class MediaBody(Strict):
    """A reference to a photo uploaded with ``POST /v1/media``."""

    id: str = Field(pattern=MEDIA_ID, description="the id POST /v1/media answered (the sha256 of the photo)")
    phase: MediaPhase = Field(default="other", description="before (the problem), after (the fix), other")


class ReportIssueBody(Strict):
    grid: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                             description="the grid; without it, the grid whose boundary holds `location`")
    category: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    title: str = Field(min_length=1, max_length=200, pattern=LINE)
    description: str | None = Field(default=None, max_length=5000, pattern=TEXT)
    urgency: Literal["normal", "urgent", "emergency"] = "normal"
    risk: list[str] = Field(default_factory=list, max_length=10)
    location: Location | None = None
    resident: ResidentBody | None = None
    visit: str | None = Field(default=None, min_length=1, max_length=40, pattern=r"^[0-9a-z]+$",
                              description="the household visit (走访) the report came from")
    media: list[MediaBody] = Field(default_factory=list, max_length=20, description="photos (POST /v1/media)")
    resolved_on_site: bool = Field(default=False, description="即报即处: already handled on the spot by the "
                                                              "reporter; closed at once, nothing is dispatched")
    note: str | None = Field(default=None, max_length=2000, pattern=NO_NUL,
                             description="with resolved_on_site: what was done")
    media_url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://[^\s\x00]+$",
                                  description="an external link (Open311 media_url), kept and never fetched")
    description_public: bool = Field(default=False, description="the reporter agrees that the description be "
                                                                "published: anonymous Open311 reads show it (a "
                                                                "moderator may withdraw it)")

    @field_validator("location")
    @classmethod
    def _no_controls_in_address(cls, v: Location | None) -> Location | None:
        if v is not None and v.address is not None:
            check_line(v.address, "address")
        return v


class NoteBody(Strict):
    note: str | None = Field(default=None, max_length=2000, pattern=NO_NUL)


class UrgeBody(Strict):
    note: str | None = Field(default=None, max_length=2000, pattern=NO_NUL)
    task: str | None = Field(default=None, min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_-]+$",
                             description="the task urged (counted against its department); default: the lead")


class ResolveBody(Strict):
    note: str | None = Field(default=None, max_length=2000, pattern=NO_NUL)
    media: list[MediaBody] = Field(default_factory=list, max_length=20, description="photos (POST /v1/media)")


class ReasonBody(Strict):
    reason: str = Field(min_length=1, max_length=2000, pattern=NO_NUL)


class AcceptBody(Strict):
    reason: str | None = Field(default=None, max_length=2000, pattern=NO_NUL)


class RecategoriseBody(Strict):
    category: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    grid: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    reason: str = Field(min_length=1, max_length=2000, pattern=NO_NUL)


class MergeBody(Strict):
    into: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$",
                      description="the open issue this one is handled with (合并办理)")
    reason: str | None = Field(default=None, max_length=2000, pattern=NO_NUL)


class PublicationBody(Strict):
    public: bool = Field(description="true: anonymous Open311 reads show the description; false: they do not")
    reason: str | None = Field(default=None, max_length=2000, pattern=NO_NUL,
                               description="why (recorded with the decision, never published)")


class VerifyBody(Strict):
    passed: bool
    note: str | None = Field(default=None, max_length=2000, pattern=NO_NUL)
    media: list[MediaBody] = Field(default_factory=list, max_length=20, description="photos (POST /v1/media)")


class FeedbackBody(Strict):
    satisfaction: Literal["satisfied", "basically_satisfied", "dissatisfied"]
    note: str | None = Field(default=None, max_length=2000, pattern=NO_NUL)


class ResidentFeedbackBody(Strict):
    """The resident's own 回访 through the one-time link."""

    solved: bool
    satisfaction: Literal["satisfied", "basically_satisfied", "dissatisfied"]
    comment: str | None = Field(default=None, max_length=1000, pattern=NO_NUL)


class ExtensionRequestBody(Strict):
    # bounded: approving a far larger one failed with a 500 (no due time computable on the working-time clock)
    extension: timedelta = Field(le=timedelta(days=365), description="ISO 8601 duration up to P365D, e.g. P2D")
    reason: str = Field(min_length=1, max_length=2000, pattern=NO_NUL)


class ReturnApproveBody(Strict):
    reassign_to: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                                    description="the department that takes the task (改派); else the rules' next")
    reason: str | None = Field(default=None, max_length=2000, pattern=NO_NUL)


class ReassignBody(Strict):
    department: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    reason: str = Field(min_length=1, max_length=2000, pattern=NO_NUL)


class SuspendBody(Strict):
    reason: str = Field(min_length=1, max_length=2000, pattern=NO_NUL)
    until: datetime = Field(description="the review date (RFC 3339 with a zone), at most a year ahead")

    @field_validator("until")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError("until needs a time zone (e.g. 2026-06-01T09:00:00+08:00)")
        if v.year > 9000:
            raise ValueError("until is too far ahead")
        return v


class SuperviseBody(Strict):
    due: datetime = Field(description="the supervision's own due date (RFC 3339 with a zone)")
    reason: str = Field(min_length=1, max_length=2000, pattern=NO_NUL)
    remind_every: timedelta = Field(default=timedelta(days=1), ge=timedelta(seconds=1), le=timedelta(days=365),
                                    description="ISO 8601 duration between reminders (default P1D)")

    @field_validator("due")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError("due needs a time zone (e.g. 2026-06-01T09:00:00+08:00)")
        return v


class Created(BaseModel):
    id: str
    status: str
    version: int


def _ts(d: datetime | None) -> str | None:
    return d.isoformat().replace("+00:00", "Z") if d else None


def task_view(t: TaskState) -> dict[str, Any]:
    return {
        "id": t.id, "department": t.department, "role": t.role, "level": t.level, "status": t.status,
        "clock": t.clock, "dispatched_at": _ts(t.dispatched_at),
        "acknowledge_due": _ts(t.acknowledge_due), "resolve_due": _ts(t.resolve_due),
        "acknowledged_at": _ts(t.acknowledged_at), "resolved_at": _ts(t.resolved_at),
        "returned_at": _ts(t.returned_at), "return_reason": t.return_reason, "note": t.note,
        "warned": sorted(t.warned), "breached": sorted(t.breached),
        "extension_requested": t.extension_requested.total_seconds() if t.extension_requested else None,
        "return_requested": t.return_requested, "return_rejections": t.return_rejections,
        "extensions": t.extensions, "suspension_requested": _ts(t.suspension_requested),
        "suspension_reason": t.suspension_reason,
        "suspended": t.suspended, "suspended_until": _ts(t.suspended_until), "suspensions": t.suspensions,
        "suspended_for": t.suspended_for.total_seconds(), "reassigned_to": t.reassigned_to,
        "urges": t.urges, "supervised_due": _ts(t.supervised_due),
        "info_paused_at": _ts(t.info_paused_at), "progress_at": _ts(t.progress_at),
        "progress_missed": _ts(t.progress_missed),
    }


def media_view(m: MediaItem) -> dict[str, Any]:
    return {"id": m.id, "phase": m.phase, "stage": m.stage, "by": m.by, "task_id": m.task_id,
            "url": f"/v1/media/{m.id}", "thumb": f"/v1/media/{m.id}?size=thumb"}


def issue_view(s: IssueState, resident: dict[str, Any] | None = None, org: OrgTree | None = None) -> dict[str, Any]:
    """The issue as the API shows it; ``resident`` as the reader may see it (default: its id only). With
    ``org``, each task also carries its department's name (``department_name``), ``kind`` and the kind's display
    name (``kind_name``)."""
    if resident is None and s.resident is not None:
        resident = {"id": s.resident.id}
    tasks = [task_view(t) for t in s.tasks]
    if org is not None:
        for view in tasks:
            dept = org.departments.get(view["department"])
            if dept is not None:
                view["kind"], view["kind_name"] = dept.kind, org.kind_name(dept.kind)
                view["department_name"] = dept.name
    return {
        "id": s.id, "grid": s.grid, "category": s.category, "title": s.title, "description": s.description,
        "status": s.status, "level": s.level, "owner_area": s.owner_area, "urgency": s.urgency,
        "risk": list(s.risk), "location": s.location.model_dump() if s.location else None,
        "reporter": s.reporter, "reported_at": _ts(s.reported_at), "closed_at": _ts(s.closed_at),
        "text_shredded_at": _ts(s.text_shredded_at),
        "version": s.version, "sequence": s.last_seq, "rule": s.rule, "rulebook_version": s.rulebook_version,
        "reopen_count": s.reopen_count, "escalations": s.escalations, "satisfaction": s.satisfaction,
        "campaign": s.campaign, "visit": s.visit, "resident": resident, "tasks": tasks,
        "unserved": [u.model_dump() for u in s.unserved],
        "media": [media_view(m) for m in s.media], "media_url": s.media_url,
        "triage": {"decision": s.triage, "reason": s.triage_reason, "by": s.triaged_by} if s.triage else None,
        "suspended_until": _ts(min((t.suspended_until for t in s.open_tasks if t.suspended_until), default=None)),
        "merged_into": s.merged_into, "duplicates": list(s.duplicates),
        "review": ({"due": _ts(s.review_due), "warn": _ts(s.review_warn), "warned": s.review_warned,
                    "breached": s.review_breached} if s.review_due is not None else None),
        "description_public": s.description_public,
        "publication": ({"public": s.description_public, "by": s.publication_by, "reason": s.publication_reason}
                        if s.publication_by is not None else None),
    }
