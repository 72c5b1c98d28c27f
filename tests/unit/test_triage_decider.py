"""受理 in the decider: given an issue held for review or dispatched, when the command centre accepts,
rejects, voids or recategorises it, then one event, nothing on a retry, and 409 once a task is acknowledged."""
from __future__ import annotations

from datetime import timedelta

import pytest

from services.router.reactions import on_review_clock, review_key, review_timer
from shared.config.loader import ConfigError
from shared.config.rulebook import parse_rulebook
from shared.domain import commands as cmd
from shared.domain.errors import Conflict
from shared.domain.issue import IssueState, decide, initial_state
from shared.events import models as ev
from tests.unit.test_issue_decider import ISSUE, LEAD, T0, apply, dispatched_issue, when


def held() -> IssueState:
    report = cmd.ReportIssue(grid="wuxing-g1", category="complaint", title="t", reporter="gw", review=True)
    return apply(initial_state(ISSUE), decide(initial_state(ISSUE), report, T0))


def test_a_report_under_review_waits_and_accepting_it_once_releases_it() -> None:
    state = held()
    assert state.status == "pending_review"
    [accepted] = decide(state, cmd.AcceptIssue(by="centre", reason="属实"), T0)
    assert isinstance(accepted, ev.IssueAccepted)
    after = when(state, cmd.AcceptIssue(by="centre"))
    assert after.status == "reported" and after.triage == "accepted"
    assert decide(after, cmd.AcceptIssue(by="centre"), T0) == []  # a retry records nothing


@pytest.mark.parametrize(("command", "status"), [(cmd.RejectIssue(by="c", reason="r"), "rejected"),
                                                 (cmd.VoidIssue(by="c", reason="r"), "voided")])
def test_reject_and_void_end_the_issue_and_its_tasks_once(command: cmd.Command, status: str) -> None:
    state = when(dispatched_issue(), command)
    assert state.status == status and {t.status for t in state.tasks} == {"superseded"}
    assert state.triage_reason == "r"
    assert decide(state, command, T0) == []
    with pytest.raises(Conflict):
        decide(state, cmd.AcknowledgeTask(LEAD, by="roads"), T0)


def test_recategorise_changes_category_and_grid_and_supersedes_open_tasks() -> None:
    command = cmd.RecategoriseIssue(by="c", reason="r", category="litter", grid="wuxing-g2")
    state = when(dispatched_issue(), command)
    assert (state.category, state.grid, state.status, state.level) == ("litter", "wuxing-g2", "reported", None)
    assert not state.open_tasks
    assert decide(state, command, T0) == []


@pytest.mark.parametrize("command", [cmd.AcceptIssue(by="c"), cmd.RejectIssue(by="c", reason="r"),
                                     cmd.VoidIssue(by="c", reason="r"),
                                     cmd.RecategoriseIssue(by="c", reason="r", category="litter", grid="wuxing-g1")])
def test_no_triage_once_a_task_was_acknowledged(command: cmd.Command) -> None:
    state = when(dispatched_issue(), cmd.AcknowledgeTask(LEAD, by="roads"))
    with pytest.raises(Conflict):
        decide(state, command, T0)


def test_the_review_clock_warns_then_breaches_once_and_stops_when_the_report_is_decided() -> None:
    report = cmd.ReportIssue(grid="wuxing-g1", category="complaint", title="t", reporter="gw", review=True,
                             review_within=timedelta(minutes=30), warn_at=0.8)
    state = apply(initial_state(ISSUE), decide(initial_state(ISSUE), report, T0))
    assert (state.review_warn, state.review_due) == (T0 + timedelta(minutes=24), T0 + timedelta(minutes=30))
    assert review_timer(state) == (review_key(ISSUE), T0 + timedelta(minutes=24))
    assert on_review_clock(state, T0 + timedelta(minutes=23)) == []
    [warned] = on_review_clock(state, T0 + timedelta(minutes=25))
    assert isinstance(warned, ev.ReviewWarned)
    state = apply(state, [warned])
    assert review_timer(state) == (review_key(ISSUE), T0 + timedelta(minutes=30))
    assert on_review_clock(state, T0 + timedelta(minutes=25)) == []  # a timer handled twice: nothing more
    late = on_review_clock(apply(initial_state(ISSUE), decide(initial_state(ISSUE), report, T0)),
                           T0 + timedelta(hours=1))
    assert [type(e) for e in late] == [ev.ReviewWarned, ev.ReviewBreached]  # both edges past: in order
    state = apply(state, [ev.ReviewBreached(due=T0 + timedelta(minutes=30))])
    assert state.review_breached and state.status == "pending_review" and review_timer(state) is None
    accepted = when(held_with(report), cmd.AcceptIssue(by="centre"))
    assert review_timer(accepted) is None and on_review_clock(accepted, T0 + timedelta(hours=1)) == []


def held_with(report: cmd.ReportIssue) -> IssueState:
    return apply(initial_state(ISSUE), decide(initial_state(ISSUE), report, T0))


def test_an_automatic_intake_has_no_review_clock() -> None:
    report = cmd.ReportIssue(grid="wuxing-g1", category="complaint", title="t", reporter="gw", review=False,
                             review_within=timedelta(minutes=30))
    [reported] = decide(initial_state(ISSUE), report, T0)
    assert isinstance(reported, ev.IssueReported) and reported.review_due is None and reported.review_warn is None


def test_the_rulebook_reads_the_review_clock_per_category() -> None:
    text = """categories:
  complaint:
    name: 投诉
    start: community
    intake: review
    sla: {acknowledge: PT1H, resolve: P1D, review: PT30M}
"""
    assert parse_rulebook(text).categories["complaint"].sla.review == timedelta(minutes=30)
    assert parse_rulebook(text.replace(", review: PT30M", "")).categories["complaint"].sla.review is None
    with pytest.raises(ConfigError, match=r"sla\.review"):
        parse_rulebook(text.replace("PT30M", "PT0S"))
    with pytest.raises(ConfigError, match=r"sla\.review"):
        parse_rulebook(text.replace("PT30M", "soon"))
