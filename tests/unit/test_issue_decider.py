"""The issue aggregate as a Decider (shared/domain/issue.py): given events, when a command, then events.
Pure: no server, time and ids are arguments."""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from shared.domain import commands as cmd
from shared.domain.errors import Conflict, DomainError, Invalid, NotFound
from shared.domain.ids import new_issue_id, task_id
from shared.domain.issue import IssueState, decide, evolve, fold, initial_state
from shared.events import models as ev

T0 = datetime(2025, 3, 4, 2, 0, tzinfo=UTC)  # Tuesday 10:00 in Beijing
MIN = timedelta(minutes=1)
HOUR = timedelta(hours=1)
ISSUE = new_issue_id(int(T0.timestamp() * 1000), 0x1234_5678_9ABC_DEF0_1234)
LEAD = task_id(ISSUE, 1)
CO = task_id(ISSUE, 2)


# -- given: events as the router and intake would record them ------------------------------------------------
def reported(**changes: object) -> ev.IssueReported:
    fields: dict[str, object] = {"grid": "wuxing-g1", "category": "road_damage", "title": "路面塌陷",
                                 "reporter": "grid_worker:area:wuxing-g1", "reported_at": T0}
    return ev.IssueReported(**{**fields, **changes})  # type: ignore[arg-type]


def routed(level: str = "district", owner: str = "dinghai", caused_by: int = 1) -> ev.IssueRouted:
    return ev.IssueRouted(level=level, owner_area=owner, reason="reported", rule="test rule",
                          rulebook_version="v1", caused_by=caused_by)


def dispatched(n: int, department: str, role: str = "lead", *, at: datetime = T0, caused_by: int = 1,
               level: str = "district") -> ev.TaskDispatched:
    return ev.TaskDispatched(
        task_id=task_id(ISSUE, n), department=department, role=role, level=level, clock="natural",  # type: ignore[arg-type]
        dispatched_at=at, acknowledge_due=at + 30 * MIN, resolve_due=at + 24 * HOUR,
        acknowledge_warn=at + 24 * MIN, resolve_warn=at + 0.8 * 24 * HOUR, caused_by=caused_by)


def history(*events: ev.Event, first_seq: int = 1) -> list[tuple[ev.Event, int]]:
    return [(e, seq) for seq, e in enumerate(events, first_seq)]


def given_events(*events: ev.Event) -> IssueState:
    return fold(ISSUE, history(*events))


def apply(state: IssueState, events: list[ev.Event]) -> IssueState:
    """Fold the decided events in, as the next stream sequences."""
    for e in events:
        state = evolve(state, e, state.last_seq + 1)
    return state


def when(state: IssueState, command: cmd.Command, now: datetime = T0) -> IssueState:
    """Decide and fold (the happy path of a command)."""
    return apply(state, decide(state, command, now))


def refused(state: IssueState, command: cmd.Command, error: type[DomainError], now: datetime = T0) -> DomainError:
    with pytest.raises(error) as info:
        decide(state, command, now)
    return info.value


def dispatched_issue() -> IssueState:
    """Reported and routed to the district: lead dinghai-roads, co dinghai-police."""
    return given_events(reported(), routed(), dispatched(1, "dinghai-roads"), dispatched(2, "dinghai-police", "co"))


def resolved_issue(resolved_at: datetime = T0 + 2 * HOUR) -> IssueState:
    s = when(dispatched_issue(), cmd.AcknowledgeTask(LEAD, by="roads"), T0 + 5 * MIN)
    return when(s, cmd.ResolveTask(LEAD, by="roads", note="patched"), resolved_at)


def closed_issue() -> IssueState:
    return when(resolved_issue(), cmd.VerifyIssue(passed=True, by="grid"), T0 + 3 * HOUR)


# -- report ---------------------------------------------------------------------------------------------------
def test_report_on_a_new_issue_records_issue_reported_at_now() -> None:
    # given no events for the issue
    state = initial_state(ISSUE)
    # when a grid worker reports it
    events = decide(state, cmd.ReportIssue(grid="wuxing-g1", category="road_damage", title="路面塌陷",
                                           reporter="gw", urgency="urgent", risk=("violence",)), T0)
    # then one IssueReported carries the report, stamped with now
    assert events == [ev.IssueReported(grid="wuxing-g1", category="road_damage", title="路面塌陷", reporter="gw",
                                       urgency="urgent", risk=("violence",), reported_at=T0)]
    after = apply(state, events)
    assert (after.status, after.version, after.reported_at, after.risk) == ("reported", 1, T0, ("violence",))


def test_reporting_an_existing_issue_is_a_conflict() -> None:
    # given a reported issue
    state = given_events(reported())
    # when it is reported again, then it is refused with its current status
    err = refused(state, cmd.ReportIssue(grid="wuxing-g1", category="road_damage", title="again", reporter="gw"),
                  Conflict)
    assert err.extra == {"current_status": "reported"}


@pytest.mark.parametrize("command", [
    cmd.AcknowledgeTask(LEAD, by="h"), cmd.ResolveOnSite(by="gw"), cmd.VerifyIssue(passed=True, by="gw"),
    cmd.RecordFeedback(satisfaction="satisfied", by="gw"), cmd.UrgeIssue(by="sup"),
])
def test_commands_on_an_issue_never_reported_are_not_found(command: cmd.Command) -> None:
    # given no events, when anything but a report arrives, then the issue is not found
    err = refused(initial_state(ISSUE), command, NotFound)
    assert err.field == "id"


# -- resolve on site ------------------------------------------------------------------------------------------
def test_resolve_on_site_before_dispatch_closes_the_issue_on_time() -> None:
    # given a reported issue with no tasks yet
    state = given_events(reported())
    # when the grid worker resolves it on site
    events = decide(state, cmd.ResolveOnSite(by="gw", note="fixed it"), T0 + 10 * MIN)
    # then it is resolved on site and closed on time, with no dispatch
    assert events == [ev.IssueResolvedOnSite(by="gw", note="fixed it"),
                      ev.IssueClosed(reason="resolved_on_site", on_time=True, closed_at=T0 + 10 * MIN)]
    after = apply(state, events)
    assert (after.status, after.closed_at, after.closed_on_time, after.tasks) == ("closed", T0 + 10 * MIN, True, ())


def test_resolve_on_site_is_refused_once_tasks_were_dispatched() -> None:
    # given an issue already dispatched to departments
    state = dispatched_issue()
    # when the grid worker tries to resolve it on site, then it is a conflict
    err = refused(state, cmd.ResolveOnSite(by="gw"), Conflict)
    assert err.extra == {"current_status": "dispatched"}


def test_resolve_on_site_of_a_closed_issue_is_a_conflict() -> None:
    state = when(given_events(reported()), cmd.ResolveOnSite(by="gw"))
    err = refused(state, cmd.ResolveOnSite(by="gw"), Conflict)
    assert err.extra == {"current_status": "closed"}


# -- acknowledge ----------------------------------------------------------------------------------------------
def test_acknowledging_a_dispatched_task_records_who_and_when() -> None:
    state = dispatched_issue()
    events = decide(state, cmd.AcknowledgeTask(LEAD, by="roads"), T0 + 29 * MIN)
    assert events == [ev.TaskAcknowledged(task_id=LEAD, by="roads", at=T0 + 29 * MIN)]
    lead = apply(state, events).task(LEAD)
    assert (lead.status, lead.acknowledged_at) == ("acknowledged", T0 + 29 * MIN)


def _task_in(status: str) -> IssueState:
    """A dispatched issue whose lead task is in ``status``."""
    s = dispatched_issue()
    if status == "acknowledged":
        return when(s, cmd.AcknowledgeTask(LEAD, by="roads"))
    if status == "resolved":
        return when(s, cmd.ResolveTask(LEAD, by="roads"))
    if status == "returned":
        return when(s, cmd.ReturnTask(LEAD, by="roads", reason="not ours"))
    if status == "superseded":
        return apply(s, [ev.TaskSuperseded(task_id=LEAD, reason="escalated to city", caused_by=9)])
    raise AssertionError(status)


@pytest.mark.parametrize("status", ["acknowledged", "resolved", "returned", "superseded"])
def test_acknowledging_a_task_that_is_not_dispatched_is_a_conflict_naming_its_status(status: str) -> None:
    # given the lead task is no longer merely dispatched
    state = _task_in(status)
    assert state.task(LEAD).status == status
    # when it is acknowledged, then the conflict names the task's current status
    err = refused(state, cmd.AcknowledgeTask(LEAD, by="roads"), Conflict)
    assert err.extra == {"current_status": status}


@pytest.mark.parametrize("command", [
    cmd.AcknowledgeTask("nope-7", by="h"), cmd.ReturnTask(task_id(ISSUE, 99), by="h", reason="x"),
    cmd.ResolveTask(task_id(ISSUE, 3), by="h"),
    cmd.RequestExtension(task_id(ISSUE, 3), by="h", extension=HOUR, reason="x"),
    cmd.ApproveExtension(task_id(ISSUE, 3), by="s", resolve_due=T0, resolve_warn=T0),
])
def test_a_command_on_an_unknown_task_is_not_found(command: cmd.Command) -> None:
    err = refused(dispatched_issue(), command, NotFound)
    assert err.field == "task_id"


# -- return and resolve ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", ["dispatched", "acknowledged"])
def test_an_open_task_can_be_returned_with_a_reason(status: str) -> None:
    state = dispatched_issue() if status == "dispatched" else _task_in(status)
    events = decide(state, cmd.ReturnTask(LEAD, by="roads", reason="not a road"), T0 + HOUR)
    assert events == [ev.TaskReturned(task_id=LEAD, by="roads", reason="not a road", at=T0 + HOUR)]
    lead = apply(state, events).task(LEAD)
    assert (lead.status, lead.returned_at, lead.return_reason) == ("returned", T0 + HOUR, "not a road")


@pytest.mark.parametrize("status", ["dispatched", "acknowledged"])
def test_an_open_task_can_be_resolved_with_a_note(status: str) -> None:
    state = dispatched_issue() if status == "dispatched" else _task_in(status)
    events = decide(state, cmd.ResolveTask(LEAD, by="roads", note="patched"), T0 + HOUR)
    assert events == [ev.TaskResolved(task_id=LEAD, by="roads", note="patched", at=T0 + HOUR)]
    lead = apply(state, events).task(LEAD)
    assert (lead.status, lead.resolved_at, lead.note) == ("resolved", T0 + HOUR, "patched")


@pytest.mark.parametrize("status", ["resolved", "returned", "superseded"])
@pytest.mark.parametrize("command", [cmd.ReturnTask(LEAD, by="roads", reason="x"), cmd.ResolveTask(LEAD, by="roads")])
def test_a_task_no_longer_open_cannot_be_returned_or_resolved(status: str, command: cmd.Command) -> None:
    err = refused(_task_in(status), command, Conflict)
    assert err.extra == {"current_status": status}


@pytest.mark.parametrize("command", [
    cmd.AcknowledgeTask(CO, by="police"), cmd.ReturnTask(CO, by="police", reason="x"), cmd.ResolveTask(CO, by="p"),
])
def test_a_closed_issue_accepts_no_task_command_even_for_a_task_left_open(command: cmd.Command) -> None:
    # given a closed issue whose co task was still dispatched when it closed (it is superseded on close)
    state = closed_issue()
    assert state.task(CO).status == "superseded"
    # when a handler acts on the task, then the issue being closed is the conflict
    err = refused(state, command, Conflict)
    assert err.extra == {"current_status": "closed"}


# -- verify ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("state_of", ["reported", "dispatched", "in_progress"])
def test_only_a_resolved_issue_can_be_verified(state_of: str) -> None:
    state = {"reported": lambda: given_events(reported()), "dispatched": dispatched_issue,
             "in_progress": lambda: _task_in("acknowledged")}[state_of]()
    assert state.status == state_of
    err = refused(state, cmd.VerifyIssue(passed=True, by="gw"), Conflict)
    assert err.extra == {"current_status": state_of}


def test_passed_verification_closes_on_time_when_the_lead_resolved_before_its_due() -> None:
    # given the lead resolved 2 h after dispatch (due after 24 h)
    state = resolved_issue(T0 + 2 * HOUR)
    # when the grid worker verifies the fix
    events = decide(state, cmd.VerifyIssue(passed=True, by="gw", note="ok"), T0 + 30 * HOUR)
    # then the issue is verified and closed on time (on time is the lead's resolution, not the verification)
    assert events == [ev.IssueVerified(passed=True, by="gw", note="ok"),
                      ev.IssueClosed(reason="verified", on_time=True, closed_at=T0 + 30 * HOUR)]
    after = apply(state, events)
    assert (after.status, after.closed_on_time, after.closed_at) == ("closed", True, T0 + 30 * HOUR)
    assert after.open_tasks == ()


@pytest.mark.parametrize(("resolved_after", "on_time"), [
    (24 * HOUR, True), (24 * HOUR + timedelta(milliseconds=1), False), (3 * 24 * HOUR, False)])
def test_closed_on_time_compares_the_lead_resolution_with_its_resolve_due(resolved_after: timedelta,
                                                                         on_time: bool) -> None:
    state = resolved_issue(T0 + resolved_after)
    events = decide(state, cmd.VerifyIssue(passed=True, by="gw"), T0 + 4 * 24 * HOUR)
    assert events[-1] == ev.IssueClosed(reason="verified", on_time=on_time, closed_at=T0 + 4 * 24 * HOUR)


def test_an_approved_extension_moves_the_due_used_for_on_time() -> None:
    # given the lead's resolve due was extended by a day, and it resolved after the old due
    s = when(dispatched_issue(), cmd.AcknowledgeTask(LEAD, by="roads"))
    s = when(s, cmd.RequestExtension(LEAD, by="roads", extension=24 * HOUR, reason="asphalt"))
    s = when(s, cmd.ApproveExtension(LEAD, by="sup", resolve_due=T0 + 48 * HOUR, resolve_warn=T0 + 38 * HOUR))
    s = when(s, cmd.ResolveTask(LEAD, by="roads"), T0 + 30 * HOUR)
    # when it is verified, then it closed on time
    assert decide(s, cmd.VerifyIssue(passed=True, by="gw"), T0 + 31 * HOUR)[-1].on_time is True  # type: ignore[attr-defined]


def test_failed_verification_reopens_and_supersedes_the_open_tasks() -> None:
    # given the lead resolved while the co task is still dispatched
    state = resolved_issue()
    # when the verification fails
    events = decide(state, cmd.VerifyIssue(passed=False, by="gw", note="still broken"), T0 + 3 * HOUR)
    # then the issue reopens (返工) with the next reopen count
    assert events == [ev.IssueVerified(passed=False, by="gw", note="still broken"),
                      ev.IssueReopened(reason="still broken", reopen_count=1)]
    after = apply(state, events)
    assert (after.status, after.reopen_count, after.failed_verifications) == ("reopened", 1, 1)
    # and the open co task is superseded while the resolved lead keeps its history
    assert after.task(CO).status == "superseded" and after.task(LEAD).status == "resolved"
    assert after.open_tasks == ()


def test_a_second_failed_verification_counts_two_reopens() -> None:
    # given a reopened issue re-dispatched and resolved again
    s = when(resolved_issue(), cmd.VerifyIssue(passed=False, by="gw"), T0 + 3 * HOUR)
    s = apply(s, [dispatched(3, "dinghai-roads", at=T0 + 4 * HOUR, caused_by=s.last_seq)])
    s = when(s, cmd.ResolveTask(task_id(ISSUE, 3), by="roads"), T0 + 5 * HOUR)
    assert s.status == "resolved"
    # when the verification fails again
    events = decide(s, cmd.VerifyIssue(passed=False, by="gw"), T0 + 6 * HOUR)
    # then the reopen count is two
    assert events[-1] == ev.IssueReopened(reopen_count=2)
    assert (apply(s, events).failed_verifications, apply(s, events).reopen_count) == (2, 2)


# -- feedback -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("state_of", ["resolved", "closed"])
def test_feedback_is_recorded_once_the_issue_is_resolved_or_closed(state_of: str) -> None:
    state = resolved_issue() if state_of == "resolved" else closed_issue()
    events = decide(state, cmd.RecordFeedback(satisfaction="basically_satisfied", by="gw"), T0 + 4 * HOUR)
    assert events == [ev.FeedbackRecorded(satisfaction="basically_satisfied", by="gw")]
    assert apply(state, events).satisfaction == "basically_satisfied"


@pytest.mark.parametrize("state_of", ["reported", "dispatched", "in_progress", "reopened"])
def test_feedback_before_resolution_is_a_conflict(state_of: str) -> None:
    state = {"reported": lambda: given_events(reported()), "dispatched": dispatched_issue,
             "in_progress": lambda: _task_in("acknowledged"),
             "reopened": lambda: when(resolved_issue(), cmd.VerifyIssue(passed=False, by="gw"))}[state_of]()
    err = refused(state, cmd.RecordFeedback(satisfaction="dissatisfied", by="gw"), Conflict)
    assert err.extra == {"current_status": state_of}


# -- escalate and urge ----------------------------------------------------------------------------------------
def test_escalating_records_one_level_up_as_requested() -> None:
    events = decide(dispatched_issue(), cmd.EscalateIssue(by="gw", reason="逐级反映", to_level="city"), T0)
    assert events == [ev.IssueEscalated(from_level="district", to_level="city", cause="requested",
                                        reason="逐级反映", by="gw")]
    assert apply(dispatched_issue(), events).escalations == 1


def test_escalating_at_the_city_is_a_conflict() -> None:
    state = given_events(reported(), routed("city", "city"), dispatched(1, "city-center", level="city"))
    err = refused(state, cmd.EscalateIssue(by="gw", reason="higher", to_level=None), Conflict)
    assert err.extra == {"current_status": "dispatched"}


def test_escalating_an_issue_not_routed_yet_is_a_conflict() -> None:
    refused(given_events(reported()), cmd.EscalateIssue(by="gw", reason="r", to_level="street"), Conflict)


def test_urging_an_open_issue_records_it_and_a_closed_one_is_a_conflict() -> None:
    assert decide(dispatched_issue(), cmd.UrgeIssue(by="sup", note="快"), T0) == [ev.IssueUrged(by="sup", note="快")]
    refused(closed_issue(), cmd.UrgeIssue(by="sup"), Conflict)


# -- extensions -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extension", [timedelta(0), -HOUR])
def test_an_extension_request_must_be_positive(extension: timedelta) -> None:
    err = refused(dispatched_issue(), cmd.RequestExtension(LEAD, by="roads", extension=extension, reason="r"),
                  Invalid)
    assert err.field == "extension"


def test_an_extension_request_is_pending_until_approved() -> None:
    # given a pending request for one more day
    s = when(dispatched_issue(), cmd.RequestExtension(LEAD, by="roads", extension=24 * HOUR, reason="rain"))
    assert s.task(LEAD).extension_requested == 24 * HOUR and not s.task(LEAD).extended
    # when a supervisor approves it
    events = decide(s, cmd.ApproveExtension(LEAD, by="sup", resolve_due=T0 + 48 * HOUR,
                                            resolve_warn=T0 + 40 * HOUR), T0 + HOUR)
    assert events == [ev.ExtensionApproved(task_id=LEAD, by="sup", resolve_due=T0 + 48 * HOUR,
                                           resolve_warn=T0 + 40 * HOUR)]
    # then the task's resolve clock moves and the request is no longer pending
    lead = apply(s, events).task(LEAD)
    assert (lead.resolve_due, lead.resolve_warn, lead.extension_requested, lead.extended) == (
        T0 + 48 * HOUR, T0 + 40 * HOUR, None, True)


def test_approving_without_a_pending_request_is_a_conflict() -> None:
    approve = cmd.ApproveExtension(LEAD, by="sup", resolve_due=T0 + 48 * HOUR, resolve_warn=T0 + 40 * HOUR)
    refused(dispatched_issue(), approve, Conflict)
    # and an approved request cannot be approved a second time
    s = when(dispatched_issue(), cmd.RequestExtension(LEAD, by="roads", extension=HOUR, reason="r"))
    refused(when(s, approve), approve, Conflict)


def test_an_extension_cannot_be_requested_for_a_resolved_task() -> None:
    err = refused(_task_in("resolved"), cmd.RequestExtension(LEAD, by="roads", extension=HOUR, reason="r"), Conflict)
    assert err.extra == {"current_status": "resolved"}


# -- status, lead, handled, version ---------------------------------------------------------------------------
def test_status_goes_reported_dispatched_in_progress_resolved_closed() -> None:
    seen = []
    s = given_events(reported())
    seen.append(s.status)
    s = apply(s, [routed(), dispatched(1, "dinghai-roads"), dispatched(2, "dinghai-police", "co")])
    seen.append(s.status)
    s = when(s, cmd.AcknowledgeTask(LEAD, by="roads"))
    seen.append(s.status)
    s = when(s, cmd.ResolveTask(LEAD, by="roads"))
    seen.append(s.status)
    s = when(s, cmd.VerifyIssue(passed=True, by="gw"))
    seen.append(s.status)
    assert seen == ["reported", "dispatched", "in_progress", "resolved", "closed"]


def test_a_co_acknowledgement_does_not_put_the_issue_in_progress() -> None:
    s = when(dispatched_issue(), cmd.AcknowledgeTask(CO, by="police"))
    assert s.status == "dispatched" and s.task(CO).status == "acknowledged"


def test_a_co_resolution_does_not_resolve_the_issue() -> None:
    s = when(_task_in("acknowledged"), cmd.ResolveTask(CO, by="police"))
    assert s.status == "in_progress" and s.task(CO).status == "resolved"


def test_the_lead_is_the_latest_lead_not_superseded() -> None:
    # given the district lead was superseded by a city lead
    s = apply(dispatched_issue(), [ev.TaskSuperseded(task_id=LEAD, reason="escalated to city", caused_by=9),
                                   ev.TaskSuperseded(task_id=CO, reason="escalated to city", caused_by=9),
                                   dispatched(3, "city-center", level="city", caused_by=9)])
    assert s.lead is not None and s.lead.id == task_id(ISSUE, 3)
    assert [t.id for t in s.open_tasks] == [task_id(ISSUE, 3)]
    assert given_events(reported()).lead is None


def test_handled_collects_the_causing_seqs_of_router_events() -> None:
    # given router events caused by seq 1 and seq 7, and intake events that name no cause
    s = fold(ISSUE, [(reported(), 1), (routed(caused_by=1), 2), (dispatched(1, "dinghai-roads", caused_by=1), 3),
                     (ev.TaskReturned(task_id=LEAD, by="roads", reason="x", at=T0), 7),
                     (dispatched(2, "dinghai-center", caused_by=7), 8)])
    # then the state remembers exactly the causes the router already answered
    assert s.handled == frozenset({1, 7})


def test_version_counts_events_and_last_seq_follows_the_stream_sequence() -> None:
    # given events stored at sparse stream sequences (other issues' events in between)
    events = [(reported(), 5), (routed(caused_by=5), 17), (ev.IssueUrged(by="sup"), 42)]
    s = fold(ISSUE, events)
    # then the version counts this issue's events and last_seq is the newest sequence
    assert (s.version, s.last_seq) == (3, 42)
    # and an event folded without a sequence (not stored yet) bumps the version but keeps last_seq
    s2 = evolve(s, ev.IssueUrged(by="sup"))
    assert (s2.version, s2.last_seq) == (4, 42)
    assert initial_state(ISSUE).version == 0 and not initial_state(ISSUE).exists


def test_an_urge_only_counts_against_the_lead_task() -> None:
    s = dispatched_issue()
    after = evolve(s, ev.IssueUrged(by="sup", note="快"), 99)
    lead = s.lead
    assert lead is not None
    tasks = tuple(replace(t, urges=1) if t.id == lead.id else t for t in s.tasks)
    assert after == replace(s, version=s.version + 1, last_seq=99, tasks=tasks)


def test_sla_warnings_and_breaches_are_remembered_per_clock() -> None:
    s = apply(dispatched_issue(), [
        ev.SlaWarned(task_id=LEAD, clock="acknowledge", due=T0 + 30 * MIN),
        ev.SlaBreached(task_id=LEAD, clock="acknowledge", due=T0 + 30 * MIN),
        ev.SlaWarned(task_id=CO, clock="resolve", due=T0 + 24 * HOUR)])
    assert (s.task(LEAD).warned, s.task(LEAD).breached) == ({"acknowledge"}, {"acknowledge"})
    assert (s.task(CO).warned, s.task(CO).breached) == ({"resolve"}, frozenset())


# -- property: random command sequences -----------------------------------------------------------------------
@dataclass(frozen=True)
class Dispatch:
    """Not a command: the router dispatching one more task (so that commands have tasks to act on)."""

    role: str


TASK_IDS = st.integers(0, 7).map(lambda i: f"slot-{i}")  # bound to one of the issue's tasks when the step runs
BY = st.sampled_from(["gw", "roads", "police", "sup"])
WEIGHTED: list[tuple[int, st.SearchStrategy[cmd.Command | Dispatch]]] = [
    # the steps that move an issue along come up more often than the rest
    (4, st.builds(Dispatch, role=st.sampled_from(["lead", "lead", "co"]))),
    (4, st.builds(cmd.AcknowledgeTask, task_id=TASK_IDS, by=BY)),
    (4, st.builds(cmd.ResolveTask, task_id=TASK_IDS, by=BY)),
    (3, st.builds(cmd.VerifyIssue, passed=st.booleans(), by=BY)),
    (1, st.builds(cmd.ReportIssue, grid=st.just("wuxing-g1"), category=st.just("road_damage"), title=st.just("t"),
                  reporter=BY)),
    (1, st.builds(cmd.ResolveOnSite, by=BY)),
    (1, st.builds(cmd.ReturnTask, task_id=TASK_IDS, by=BY, reason=st.just("not ours"))),
    (1, st.builds(cmd.RecordFeedback, by=BY,
                  satisfaction=st.sampled_from(["satisfied", "basically_satisfied", "dissatisfied"]))),
    (1, st.builds(cmd.EscalateIssue, by=BY, reason=st.just("r"), to_level=st.sampled_from([None, "city"]))),
    (1, st.builds(cmd.RequestExtension, task_id=TASK_IDS, by=BY, reason=st.just("r"),
                  extension=st.timedeltas(min_value=-HOUR, max_value=timedelta(days=3)))),
    (1, st.builds(cmd.ApproveExtension, task_id=TASK_IDS, by=BY, resolve_due=st.just(T0 + 72 * HOUR),
                  resolve_warn=st.just(T0 + 60 * HOUR))),
    (1, st.builds(cmd.UrgeIssue, by=BY, task_id=st.one_of(st.none(), TASK_IDS))),
]
STEPS = st.sampled_from([strategy for weight, strategy in WEIGHTED for _ in range(weight)]).flatmap(lambda s: s)


def _bind_task(step: cmd.Command, state: IssueState) -> cmd.Command:
    """Point a task command at one of the issue's tasks (open ones first), or at an unknown task."""
    slot = getattr(step, "task_id", "") or ""
    if not slot.startswith("slot-"):
        return step
    ids = [t.id for t in state.open_tasks] + [t.id for t in state.tasks] + [task_id(ISSUE, 99)]
    return replace(step, task_id=ids[int(slot.removeprefix("slot-")) % len(ids)])  # type: ignore[type-var]


def _router_dispatch(state: IssueState, step: Dispatch, now: datetime) -> list[ev.Event]:
    if not state.exists or state.status == "closed":
        return []
    out: list[ev.Event] = [] if state.level else [routed(caused_by=state.last_seq)]
    return [*out, dispatched(len(state.tasks) + 1, f"dept-{len(state.tasks)}", step.role, at=now,
                             caused_by=state.last_seq)]


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(st.tuples(STEPS, st.integers(0, 600), st.integers(1, 3)), min_size=15, max_size=50))
def test_random_valid_command_sequences_fold_to_the_threaded_state(
        steps: list[tuple[cmd.Command | Dispatch, int, int]]) -> None:
    # given a reported issue
    now = T0
    log: list[tuple[ev.Event, int]] = [(reported(), 1)]
    state = evolve(initial_state(ISSUE), reported(), 1)
    for step, minutes, gap in steps:
        now += minutes * MIN
        was_closed = state.status == "closed"
        # when each command is decided (refused ones change nothing) and its events folded one by one
        if isinstance(step, Dispatch):
            events = _router_dispatch(state, step, now)
        else:
            try:
                events = decide(state, _bind_task(step, state), now)
            except DomainError:
                continue
        for e in events:
            seq = log[-1][1] + gap
            state = evolve(state, e, seq)
            log.append((e, seq))
        # then the version counts every event and last_seq follows the stream
        assert (state.version, state.last_seq) == (len(log), log[-1][1])
        # and a closed issue stays closed, has no open task, and refuses every task command
        if was_closed:
            assert state.status == "closed"
        if state.status == "closed":
            assert state.open_tasks == ()
            for tid in [t.id for t in state.tasks] + [task_id(ISSUE, 99)]:
                for command in (cmd.AcknowledgeTask(tid, by="h"), cmd.ReturnTask(tid, by="h", reason="r"),
                                cmd.ResolveTask(tid, by="h")):
                    with pytest.raises(Conflict):
                        decide(state, command, now)
    event(f"final status {state.status}")
    event(f"reopened {min(state.reopen_count, 2)} times")
    # then folding the whole history gives the state threaded through evolve step by step
    assert fold(ISSUE, log) == state
    assert state.handled == {c for e, _ in log if (c := getattr(e, "caused_by", 0))}


# -- the fold's replace: the same state as dataclasses.replace, at a third of the cost ------------------------
def test_the_folds_replace_changes_exactly_the_named_fields_like_dataclasses_replace() -> None:
    from dataclasses import fields as fields_of

    from shared.domain.issue import TaskState, _issue_with, _task_with

    before = fold(ISSUE, [(reported(), 1), (routed(), 2), (dispatched(1, "dinghai-housing"), 3)])
    other = fold(ISSUE, [(reported(title="另一个", urgency="urgent"), 5), (routed("street", "zhanmao"), 6),
                         (dispatched(1, "x", "co"), 7), (ev.TaskAcknowledged(task_id=LEAD, by="h", at=T0), 8),
                         (ev.IssueEscalated(from_level="street", to_level="district", cause="resolve_breach",
                                            caused_by=8), 9)])
    for f in fields_of(IssueState):  # each field alone, then all of them at once
        assert _issue_with(before, **{f.name: getattr(other, f.name)}) == replace(
            before, **{f.name: getattr(other, f.name)})
    everything = {f.name: getattr(other, f.name) for f in fields_of(IssueState)}
    assert _issue_with(before, **everything) == other == replace(before, **everything)
    task, changed = before.tasks[0], other.tasks[0]
    for tf in fields_of(TaskState):
        assert _task_with(task, **{tf.name: getattr(changed, tf.name)}) == replace(
            task, **{tf.name: getattr(changed, tf.name)})
    assert _issue_with(before) == before and _issue_with(before) is not before
    with pytest.raises(KeyError):
        _issue_with(before, no_such_field=1)


# -- dispatch control (issue 19) -------------------------------------------------------------------------------
def test_on_time_closure_is_measured_from_the_first_dispatch_plus_what_was_granted() -> None:
    # the district's lead was superseded by the city's 20 h later: the city's clock runs to T0 + 44 h, but the
    # issue's clock (the first dispatch's) ran out at T0 + 24 h
    s = given_events(reported(), routed(), dispatched(1, "dinghai-roads"),
                     ev.IssueEscalated(from_level="district", to_level="city", cause="requested"),
                     ev.TaskSuperseded(task_id=LEAD, reason="escalated"),
                     dispatched(2, "city-roads", at=T0 + 20 * HOUR, level="city"))
    s = when(s, cmd.ResolveTask(task_id(ISSUE, 2), by="city"), T0 + 30 * HOUR)
    (_, closed) = decide(s, cmd.VerifyIssue(passed=True, by="gw"), T0 + 31 * HOUR)
    assert isinstance(closed, ev.IssueClosed) and closed.on_time is False
    # an approved extension (10 h) and a suspension (resumed 5 h later, moving the due by 5 h) count for it
    s = given_events(reported(), routed(), dispatched(1, "dinghai-roads"),
                     ev.ExtensionRequested(task_id=LEAD, by="h", extension=10 * HOUR, reason="r"),
                     ev.ExtensionApproved(task_id=LEAD, by="sup", resolve_due=T0 + 34 * HOUR,
                                          resolve_warn=T0 + 30 * HOUR),
                     ev.SuspensionApproved(task_id=LEAD, by="sup", until=T0 + 10 * HOUR, at=T0 + HOUR),
                     ev.TaskResumed(task_id=LEAD, by="h", at=T0 + 6 * HOUR, acknowledge_due=T0 + 6 * HOUR,
                                    resolve_due=T0 + 39 * HOUR, acknowledge_warn=T0 + 6 * HOUR,
                                    resolve_warn=T0 + 35 * HOUR))
    assert s.granted == 15 * HOUR and s.task(LEAD).suspended_for == 5 * HOUR
    for resolved_at, on_time in ((T0 + 39 * HOUR, True), (T0 + 39 * HOUR + MIN, False)):
        r = when(s, cmd.ResolveTask(LEAD, by="roads"), resolved_at)
        assert decide(r, cmd.VerifyIssue(passed=True, by="gw"), T0 + 50 * HOUR)[-1].on_time is on_time  # type: ignore[union-attr]


def test_a_suspended_task_has_no_clock_edge_but_its_review_reminder() -> None:
    from services.router.reactions import pending_edges  # the router's pure clock edges
    s = given_events(reported(), routed(), dispatched(1, "dinghai-roads"))
    s = when(s, cmd.RequestSuspension(LEAD, by="h", reason="court", until=T0 + 48 * HOUR, max=48 * HOUR), T0)
    s = when(s, cmd.ApproveSuspension(LEAD, by="sup", max_count=1), T0 + MIN)
    assert [(e.clock, e.edge) for _, e in pending_edges(s.task(LEAD))] == [("suspension", "due")]
    with pytest.raises(Conflict, match="already suspended"):
        decide(s, cmd.RequestSuspension(LEAD, by="h", reason="again", until=T0 + 49 * HOUR), T0 + 2 * MIN)
    s = when(s, cmd.ResumeTask(LEAD, by="h", acknowledge_due=T0 + HOUR, resolve_due=T0 + 25 * HOUR,
                               acknowledge_warn=T0 + HOUR, resolve_warn=T0 + 20 * HOUR), T0 + 3 * MIN)
    assert s.task(LEAD).suspended_for == 2 * MIN and not s.task(LEAD).suspended
    with pytest.raises(Conflict, match=r"suspension\.max_count"):
        decide(s, cmd.RequestSuspension(LEAD, by="h", reason="again", until=T0 + 49 * HOUR, max_count=1), T0)


def test_an_info_request_holds_the_lead_clocks_until_the_grid_workers_reply() -> None:
    from services.router.reactions import pending_edges
    s = given_events(reported(), routed(), dispatched(1, "dinghai-roads"), dispatched(2, "dinghai-police", "co"))
    ask = cmd.AddComment(by="h", role="handler", text="照片?", kind="info_request", department="dinghai-roads",
                         pauses=True)
    assert decide(s, replace(ask, pauses=False), T0)[1:] == []  # no rule: a comment only
    assert decide(s, replace(ask, department="dinghai-police"), T0)[1:] == []  # the co-handler's: no pause
    s = when(s, ask, T0 + HOUR)
    assert s.task(LEAD).info_paused_at == T0 + HOUR and pending_edges(s.task(LEAD)) == []
    assert decide(s, ask, T0 + 2 * HOUR)[1:] == []  # held already: no second pause
    with pytest.raises(Conflict, match="info_request"):  # no suspension decided meanwhile
        decide(when(s, cmd.RequestSuspension(LEAD, by="h", reason="r", until=T0 + 9 * HOUR), T0 + HOUR),
               cmd.ApproveSuspension(LEAD, by="sup"), T0 + 2 * HOUR)
    moved = cmd.MovedClocks(LEAD, acknowledge_due=T0 + 5 * HOUR, resolve_due=T0 + 30 * HOUR,
                            acknowledge_warn=T0 + 4 * HOUR, resolve_warn=T0 + 25 * HOUR)
    reply = cmd.AddComment(by="gw", role="grid_worker", text="已补充", kind="info_reply", resume=moved)
    assert decide(s, replace(reply, role="handler"), T0 + 3 * HOUR)[1:] == []  # only the grid worker's reply
    with pytest.raises(Conflict):
        decide(s, replace(reply, resume=None), T0 + 3 * HOUR)
    r = when(s, reply, T0 + 3 * HOUR)
    t = r.task(LEAD)
    assert t.info_paused_at is None and (t.resolve_due, t.acknowledge_warn) == (T0 + 30 * HOUR, T0 + 4 * HOUR)
    assert r.granted == T0 + 30 * HOUR - s.task(LEAD).resolve_due
    assert decide(r, reply, T0 + 4 * HOUR)[1:] == []  # nothing held any more


def test_an_urge_names_an_open_task_or_counts_against_the_lead() -> None:
    s = given_events(reported(), routed(), dispatched(1, "dinghai-roads"), dispatched(2, "dinghai-police", "co"))
    co = task_id(ISSUE, 2)
    s = when(s, cmd.UrgeIssue(by="sup", task_id=co), T0)
    s = when(s, cmd.UrgeIssue(by="sup"), T0)
    assert (s.task(LEAD).urges, s.task(co).urges) == (1, 1)
    refused(s, cmd.UrgeIssue(by="sup", task_id=task_id(ISSUE, 9)), NotFound)
    done = when(when(s, cmd.AcknowledgeTask(co, by="p"), T0), cmd.ResolveTask(co, by="p"), T0)
    refused(done, cmd.UrgeIssue(by="sup", task_id=co), Conflict)


# -- publication of the description in anonymous reads (issue 17, item 1) --------------------------------------
def test_a_report_carries_the_reporters_mark_that_the_description_may_be_public() -> None:
    report = cmd.ReportIssue(grid="wuxing-g1", category="road_damage", title="路面塌陷", reporter="gw",
                             description="井盖缺失", description_public=True)
    (e,) = decide(initial_state(ISSUE), report, T0)
    assert isinstance(e, ev.IssueReported) and e.description_public
    assert apply(initial_state(ISSUE), [e]).description_public
    # unmarked (the default, and every report recorded before the field existed): not public
    (plain,) = decide(initial_state(ISSUE), replace(report, description_public=False), T0)
    assert not plain.description_public  # type: ignore[union-attr]
    assert not given_events(reported()).description_public


def test_a_moderator_approves_and_withdraws_the_description_once_each() -> None:
    s = dispatched_issue()
    assert not s.description_public
    approve = cmd.SetDescriptionPublication(by="sup", public=True, reason="无个人信息")
    assert decide(s, approve, T0) == [ev.DescriptionPublicationChanged(public=True, by="sup", reason="无个人信息")]
    s = when(s, approve)
    assert (s.description_public, s.publication_by, s.publication_reason) == (True, "sup", "无个人信息")
    assert decide(s, approve, T0) == []  # already public: nothing more to record
    withdraw = cmd.SetDescriptionPublication(by="admin", public=False)
    s = when(s, withdraw)
    assert (s.description_public, s.publication_by, s.publication_reason) == (False, "admin", None)
    assert decide(s, withdraw, T0) == []


def test_withdrawing_the_reporters_mark_records_it_and_confirming_it_records_nothing() -> None:
    s = given_events(reported(description_public=True))
    assert decide(s, cmd.SetDescriptionPublication(by="sup", public=True), T0) == []
    s = when(s, cmd.SetDescriptionPublication(by="sup", public=False, reason="含门牌号"))
    assert not s.description_public and s.publication_reason == "含门牌号"


def test_publication_is_decided_whatever_the_status_but_not_for_an_issue_that_does_not_exist() -> None:
    closed = when(resolved_issue(), cmd.VerifyIssue(by="gw", passed=True), T0 + 3 * HOUR)
    assert closed.status == "closed"
    assert when(closed, cmd.SetDescriptionPublication(by="sup", public=True)).description_public
    refused(initial_state(ISSUE), cmd.SetDescriptionPublication(by="sup", public=True), NotFound)
