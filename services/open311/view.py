"""Issues as GeoReport v2 service requests (pure: org, rulebook and time zone come in as arguments).

Only non-personal fields leave: never the reporter, nor contact details (which are not stored at all).
Two views (docs/OPEN311.md, "Reading requests"; docs/SECURITY.md):

* **anonymous** (no key, or a key whose scope does not cover the issue): the service, status, dates, the
  responsible department's name, the grid's name as address and a point rounded to PUBLIC_DECIMALS
  (about 100 m); ``status_notes`` names the status only (never a reason or a note); ``description`` only
  when it is public (the reporter marked it so and no moderator withdrew it, or a moderator approved it:
  ``IssueState.description_public``), without an address Open311 appended to it; null otherwise;
* **full** (a key whose scope covers the issue's grid): the reported point and address, the description and
  the notes, as before.
``status`` is ``closed`` once the issue is closed and ``open`` before; ``agency_responsible`` is the name of
the current lead department; ``expected_datetime`` is the lead task's resolve deadline.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, tzinfo
from typing import Any

from shared.config import OrgTree, Rulebook
from shared.domain.issue import IssueState
from shared.events import models as ev
from shared.events.codec import Envelope

from .catalog import service_notice


def ts(value: datetime | None, tz: tzinfo) -> str | None:
    """W3C datetime with the jurisdiction's offset, e.g. ``2025-03-04T10:00:00+08:00``."""
    return value.astimezone(tz).isoformat(timespec="seconds") if value is not None else None


def department_name(org: OrgTree, department: str | None) -> str | None:
    if department is None:
        return None
    dept = org.departments.get(department)
    return dept.name if dept else department


def grid_address(org: OrgTree, grid: str) -> str | None:
    """``舟山市普陀区展茅街道大展社区第33网格``: the names from the root down to the grid."""
    if grid not in org.areas:
        return None
    return "".join(a.name for a in reversed(org.ancestors(grid)))


def grid_point(org: OrgTree, grid: str) -> tuple[float | None, float | None]:
    area = org.areas.get(grid)
    if area is None or area.location is None:
        return None, None
    return area.location.lat, area.location.lon


def status_notes(org: OrgTree, envelopes: Sequence[Envelope]) -> str | None:
    """What happened last, in a sentence: dispatched / acknowledged / returned / resolved / escalated /
    reopened / closed (co-handlers' tasks, SLA warnings and urging are left out)."""
    note: str | None = None
    leads: dict[str, str] = {}  # lead task id -> department
    escalated_to: str | None = None
    last_resolve_note: str | None = None
    for env in envelopes:
        e = env.data
        if isinstance(e, ev.IssueReported):
            note = "received"
        elif isinstance(e, ev.IssueRouted):
            note = f"routed to the {e.level} level"
        elif isinstance(e, ev.IssueEscalated):
            escalated_to = e.to_level
            note = f"escalated to {e.to_level}" + (f": {e.reason}" if e.reason else "")
            continue
        elif isinstance(e, ev.TaskDispatched) and e.role == "lead":
            leads[e.task_id] = e.department
            note = f"dispatched to {department_name(org, e.department)}"
        elif isinstance(e, ev.TaskAcknowledged) and e.task_id in leads:
            note = f"acknowledged by {department_name(org, leads[e.task_id])}; in progress"
        elif isinstance(e, ev.TaskReturned) and e.task_id in leads:
            note = f"returned by {department_name(org, leads[e.task_id])}: {e.reason}"
        elif isinstance(e, ev.TaskResolved) and e.task_id in leads:
            last_resolve_note = e.note
            note = (f"resolved by {department_name(org, leads[e.task_id])}" + (f": {e.note}" if e.note else "")
                    + "; awaiting verification by the grid worker")
        elif isinstance(e, ev.IssueReopened):
            note = "reopened for rework" + (f": {e.reason}" if e.reason else "")
        elif isinstance(e, ev.IssueResolvedOnSite):
            last_resolve_note = e.note
        elif isinstance(e, ev.IssueClosed):
            how = "verified and closed" if e.reason == "verified" else "resolved on site by the grid worker"
            note = how + (f": {last_resolve_note}" if last_resolve_note else "")
            continue
        else:
            continue
        if escalated_to and note and not note.startswith("escalated"):
            note = f"{note} (escalated to {escalated_to})"
    return note


PUBLIC_DECIMALS = 3  # a point published without a key: 0.001 degree, about 110 m north-south


def rounded(value: float | None) -> float | None:
    return round(value, PUBLIC_DECIMALS) if value is not None else None


ADDRESS_LABEL = "地址 (address): "  # how an Open311 address without a point is kept in the description


def public_description(state: IssueState) -> str | None:
    """What an anonymous reader sees as the description: None unless it is public; then the description (the
    title when none), cut before an address Open311 appended to it (``ADDRESS_LABEL``: the published place is
    the grid and a rounded point, never an address)."""
    if not state.description_public:
        return None
    text = state.description or ""
    if ADDRESS_LABEL in text:
        text = text[:text.rfind(ADDRESS_LABEL)].rstrip()
    return text or state.title


def from_state(org: OrgTree, rulebook: Rulebook, state: IssueState, envelopes: Sequence[Envelope],
               full: bool = False) -> dict[str, Any]:
    """One request, folded from the event store; ``full``: the view of a key that covers the issue."""
    tz = rulebook.tz
    cat = rulebook.categories.get(state.category)
    lead = state.lead
    lat, lon = grid_point(org, state.grid)
    address = grid_address(org, state.grid)
    if state.location is not None:
        lat, lon = state.location.lat, state.location.lon
        if full:
            address = state.location.address or address
    description: str | None
    if full:
        notes, description = status_notes(org, envelopes), state.description or state.title
    else:
        dept = department_name(org, lead.department) if lead else None
        notes = _ROW_NOTES.get(state.status, state.status).format(dept=dept or "the department")
        description, lat, lon = public_description(state), rounded(lat), rounded(lon)
    return {
        "service_request_id": state.id,
        "status": "closed" if state.status == "closed" else "open",
        "status_notes": notes,
        "service_name": cat.name if cat else state.category,
        "service_code": state.category,
        "description": description,
        "agency_responsible": department_name(org, lead.department) if lead else None,
        "service_notice": service_notice(rulebook, state.category, state.urgency),
        "requested_datetime": ts(state.reported_at, tz),
        "updated_datetime": ts(envelopes[-1].time if envelopes else state.reported_at, tz),
        "expected_datetime": ts(lead.resolve_due, tz) if lead and state.status != "closed" else None,
        "address": address,
        "address_id": None,
        "zipcode": None,
        "lat": lat,
        "long": lon,
        "media_url": state.media_url,  # the reporter's own link, as given (never fetched)
    }


_ROW_NOTES: dict[str, str] = {
    "reported": "received", "dispatched": "dispatched to {dept}", "in_progress": "in progress at {dept}",
    "resolved": "resolved by {dept}; awaiting verification by the grid worker", "reopened": "reopened for rework",
    "closed": "closed",
}


def from_row(org: OrgTree, rulebook: Rulebook, row: Mapping[str, Any], full: bool = False) -> dict[str, Any]:
    """One request of a list, from the ``issues`` read model (the location is the grid's reference point and
    the description the issue's title: the read model keeps neither the reported point nor the full text).
    Without ``full`` (a key covering the issue) the title is shown only when the description is public."""
    tz = rulebook.tz
    cat = rulebook.categories.get(row["category"])
    dept = department_name(org, row["lead_department"])
    lat, lon = grid_point(org, row["grid"])
    closed = row["status"] == "closed"
    return {
        "service_request_id": row["id"],
        "status": "closed" if closed else "open",
        "status_notes": _ROW_NOTES.get(row["status"], row["status"]).format(dept=dept or "the department"),
        "service_name": cat.name if cat else row["category"],
        "service_code": row["category"],
        "description": row["title"] if full or row.get("description_public") else None,
        "agency_responsible": dept,
        "service_notice": service_notice(rulebook, row["category"], row.get("urgency") or "normal"),
        "requested_datetime": ts(row["reported_at"], tz),
        "updated_datetime": ts(row["updated_at"], tz),
        "expected_datetime": ts(row.get("resolve_due"), tz) if not closed else None,
        "address": grid_address(org, row["grid"]),
        "address_id": None,
        "zipcode": None,
        "lat": lat,
        "long": lon,
        "media_url": None,
    }
