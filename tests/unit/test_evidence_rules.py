"""Evidence rules in the decider: given the rule the rulebook sets, when a report / resolve / on-site
resolution comes with or without the photo, then the events or a 422 naming ``media`` and the rule.
And the rulebook's ``evidence:`` syntax."""
from __future__ import annotations

import pytest

from shared.config.loader import ConfigError
from shared.config.rulebook import Evidence, parse_rulebook
from shared.domain import commands as cmd
from shared.domain.errors import Invalid
from shared.domain.issue import decide, initial_state
from shared.events import models as ev
from tests.unit.test_issue_decider import ISSUE, LEAD, T0, apply, dispatched_issue, when

BEFORE = ev.MediaRef(id="a" * 64, phase="before")
AFTER = ev.MediaRef(id="b" * 64, phase="after")
REPORT_RULE, RESOLVE_RULE = "categories.litter.evidence.report", "categories.litter.evidence.resolve"


def report(**changes: object) -> cmd.ReportIssue:
    fields: dict[str, object] = {"grid": "wuxing-g1", "category": "litter", "title": "垃圾", "reporter": "gw",
                                 "report_rule": REPORT_RULE, "resolve_rule": RESOLVE_RULE}
    return cmd.ReportIssue(**{**fields, **changes})  # type: ignore[arg-type]


def refusal(command: cmd.Command, state: object = None) -> Invalid:
    with pytest.raises(Invalid) as info:
        decide(state or initial_state(ISSUE), command, T0)  # type: ignore[arg-type]
    return info.value


def test_a_report_without_its_before_photo_is_refused_naming_the_rule() -> None:
    e = refusal(report(media=(ev.MediaRef(id="a" * 64, phase="other"),)))
    assert e.field == "media" and e.extra["rule"] == REPORT_RULE
    [reported] = decide(initial_state(ISSUE), report(media=(BEFORE,)), T0)
    assert isinstance(reported, ev.IssueReported) and reported.media == (BEFORE,)
    assert decide(initial_state(ISSUE), report(report_rule=None), T0)  # no rule, no photo needed


def test_a_report_resolved_on_the_spot_closes_at_once_with_its_after_photo() -> None:
    e = refusal(report(media=(BEFORE,), resolved_on_site=True))
    assert e.extra["rule"] == RESOLVE_RULE
    events = decide(initial_state(ISSUE), report(media=(BEFORE, AFTER), resolved_on_site=True, note="done"), T0)
    assert [type(x) for x in events] == [ev.IssueReported, ev.IssueResolvedOnSite, ev.IssueClosed]
    state = apply(initial_state(ISSUE), events)
    assert state.status == "closed" and state.closed_on_time and state.tasks == ()
    assert [(m.id, m.phase, m.stage) for m in state.media] == [(BEFORE.id, "before", "report"),
                                                               (AFTER.id, "after", "report")]


def test_a_resolve_needs_an_after_photo_when_the_rule_says_so() -> None:
    state = dispatched_issue()
    e = refusal(cmd.ResolveTask(LEAD, by="roads", resolve_rule=RESOLVE_RULE, media=(BEFORE,)), state)
    assert e.field == "media" and e.extra["rule"] == RESOLVE_RULE
    done = when(state, cmd.ResolveTask(LEAD, by="roads", resolve_rule=RESOLVE_RULE, media=(AFTER,)))
    assert done.status == "resolved" and [(m.stage, m.task_id) for m in done.media] == [("resolve", LEAD)]
    closed = when(done, cmd.VerifyIssue(passed=True, by="gw", media=(BEFORE,)))
    assert [m.stage for m in closed.media] == ["resolve", "verify"]


def test_resolve_on_site_counts_the_reports_after_photo() -> None:
    state = apply(initial_state(ISSUE), decide(initial_state(ISSUE), report(media=(BEFORE, AFTER)), T0))
    assert refusal(cmd.ResolveOnSite(by="gw", resolve_rule=RESOLVE_RULE),
                   apply(initial_state(ISSUE), decide(initial_state(ISSUE), report(media=(BEFORE,)), T0)))
    assert when(state, cmd.ResolveOnSite(by="gw", resolve_rule=RESOLVE_RULE)).status == "closed"


def test_the_rulebook_reads_evidence_per_category() -> None:
    text = """categories:
  litter:
    name: 垃圾
    start: community
    sla: {acknowledge: PT1H, resolve: P1D}
    evidence: {report: photo}
"""
    assert parse_rulebook(text).categories["litter"].evidence == Evidence(report="photo")
    with pytest.raises(ConfigError, match="evidence kind"):
        parse_rulebook(text.replace("{report: photo}", "{resolve: video}"))
    with pytest.raises(ConfigError):
        parse_rulebook(text.replace("{report: photo}", "{verify: photo}"))
