"""受理 in the decider: given an issue held for review or dispatched, when the command centre accepts,
rejects, voids or recategorises it, then one event, nothing on a retry, and 409 once a task is acknowledged."""
from __future__ import annotations

import pytest

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
