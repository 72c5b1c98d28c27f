"""The subject taxonomy: every NATS subject needle uses is spelled here and nowhere else."""
from __future__ import annotations

import re

EVENTS_STREAM = "NEEDLE_EVENTS"
TIMERS_STREAM = "NEEDLE_TIMERS"

EVENTS_ROOT = "needle.events"
ALL_EVENTS = f"{EVENTS_ROOT}.>"
ISSUE_EVENTS = f"{EVENTS_ROOT}.issue.*.*"
RULEBOOK_EVENTS = f"{EVENTS_ROOT}.rulebook.*.*"
RESIDENT_EVENTS = f"{EVENTS_ROOT}.resident.*.*"
VISIT_EVENTS = f"{EVENTS_ROOT}.visit.*.*"

TIMERS_ROOT = "needle.timers"
TIMER_SCHEDULES = f"{TIMERS_ROOT}.schedule.>"
TIMER_FIRED = f"{TIMERS_ROOT}.fired.>"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def valid_token(value: str) -> bool:
    """True when ``value`` can stand as one subject token (no dots, wildcards or spaces)."""
    return bool(_TOKEN.match(value))


# aggregates other than the issue that the event store appends to, by the events that live in them
AGGREGATE_OF_EVENT = {"visit_recorded": "visit"}


def family_of(event_name: str) -> str:
    """The subject family (the aggregate kind) an event of this name is appended to: ``issue`` unless listed."""
    return AGGREGATE_OF_EVENT.get(event_name, "issue")


def issue_event(issue_id: str, event_name: str) -> str:
    """``needle.events.issue.<id>.<type>``: one subject per issue and event type."""
    return f"{EVENTS_ROOT}.issue.{issue_id}.{event_name}"


def aggregate_event(aggregate_id: str, event_name: str) -> str:
    """Where the event store appends an event: ``issue_event``, or ``<family>.<id>.<type>`` for the events of
    another aggregate (``AGGREGATE_OF_EVENT``: a visit's)."""
    return f"{EVENTS_ROOT}.{family_of(event_name)}.{aggregate_id}.{event_name}"


def issue_events(issue_id: str, family: str = "issue") -> str:
    """Every event of one issue (the OCC scope of the issue aggregate), or of one aggregate of ``family``.
    ``issue_id`` must be one subject token: the HTTP layer refuses other ids with 422, and this is the last
    line (a ``*`` or ``>`` here would read, or guard, every issue at once)."""
    if not _TOKEN.match(issue_id):
        raise ValueError(f"not an issue id: {issue_id!r}")
    return f"{EVENTS_ROOT}.{family}.{issue_id}.*"


def visit_event(visit_id: str, event_name: str = "visit_recorded") -> str:
    """``needle.events.visit.<id>.<type>``: a household visit (走访) of a grid's service team."""
    return f"{EVENTS_ROOT}.visit.{visit_id}.{event_name}"


def events_of_type(event_name: str) -> str:
    """Every issue's events of one type, for integrators filtering with wildcards."""
    return f"{EVENTS_ROOT}.issue.*.{event_name}"


# events that are about no issue, by the subject family they live in (they belong to no area)
NON_ISSUE_EVENTS = {"rulebook_published": "rulebook", "resident_forgotten": "resident", "visit_recorded": "visit"}


def filter_of_type(event_name: str) -> str:
    """The filter subject of every event of one type, whatever its family (issue, rulebook, resident)."""
    return f"{EVENTS_ROOT}.{NON_ISSUE_EVENTS.get(event_name, 'issue')}.*.{event_name}"


def rulebook_event(version: str, event_name: str) -> str:
    return f"{EVENTS_ROOT}.rulebook.{version}.{event_name}"


def resident_event(resident_id: str, event_name: str) -> str:
    """``needle.events.resident.<id>.<type>``: facts about a resident (not about one issue)."""
    return f"{EVENTS_ROOT}.resident.{resident_id}.{event_name}"


def timer_schedule(task_id: str) -> str:
    """One pending schedule per dispatch, keyed by its first (lead) task: always the next clock edge over the
    dispatch's open tasks (a new one replaces the old). Earlier versions kept one per task (co-tasks too);
    those still fire and are handled as their dispatch's timer."""
    return f"{TIMERS_ROOT}.schedule.{task_id}"


def timer_fired(task_id: str) -> str:
    return f"{TIMERS_ROOT}.fired.{task_id}"


def parse_issue_subject(subject: str) -> tuple[str, str]:
    """``needle.events.issue.<id>.<type>`` -> (id, type)."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[0] != "needle" or parts[1] != "events" or parts[2] != "issue":
        raise ValueError(f"not an issue event subject: {subject!r}")
    return parts[3], parts[4]
