"""The projection fold (services/projections/model.py): given hand-made stored events, when ``apply`` folds them
into a ``Batch``, then the issue and task rows and the day counters per area (the grid and every ancestor) and
per department are what DOMAIN.md's rates need. Pure: no database, no NATS."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from services.projections.model import DEPT_RATES, METRICS, RATES, Batch, apply, rates
from shared.config import load_org
from shared.domain.issue import fold
from shared.events import models as ev
from shared.events.codec import Envelope

ROOT = Path(__file__).resolve().parents[2]
ORG = load_org(ROOT / "tests/fixtures/contract_org.yaml")
BJ = ZoneInfo("Asia/Shanghai")
T0 = datetime(2025, 3, 4, 10, 0, tzinfo=BJ).astimezone(UTC)  # Tuesday 10:00 in Beijing
MIN = timedelta(minutes=1)
HOUR = timedelta(hours=1)
ISSUE = "issue0001"
G1 = ["wuxing-g1", "wuxing", "huannan", "dinghai", "city"]  # the grid and every ancestor, up to the root
NOT_ABOVE_G1 = ["wuxing-g2"]
LEAD, CO = f"{ISSUE}-1", f"{ISSUE}-2"


# -- events ---------------------------------------------------------------------------------------------------
def reported(grid: str = "wuxing-g1", at: datetime = T0, category: str = "road_damage") -> ev.IssueReported:
    return ev.IssueReported(grid=grid, category=category, title="pothole", reporter="gw", reported_at=at)


def routed(level: str = "district", owner: str = "dinghai", reason: str = "reported") -> ev.IssueRouted:
    return ev.IssueRouted(level=level, owner_area=owner, reason=reason, rule="r", rulebook_version="v1")  # type: ignore[arg-type]


def dispatched(task: str = LEAD, dept: str = "dinghai-roads", role: str = "lead", at: datetime = T0,
               level: str = "district", ack: timedelta = 30 * MIN, resolve: timedelta = 24 * HOUR
               ) -> ev.TaskDispatched:
    return ev.TaskDispatched(task_id=task, department=dept, role=role, level=level, clock="natural",  # type: ignore[arg-type]
                             dispatched_at=at, acknowledge_due=at + ack, resolve_due=at + resolve,
                             acknowledge_warn=at + ack * 0.8, resolve_warn=at + resolve * 0.8)


def acked(task: str = LEAD, at: datetime = T0) -> ev.TaskAcknowledged:
    return ev.TaskAcknowledged(task_id=task, by="h", at=at)


def resolved(task: str = LEAD, at: datetime = T0) -> ev.TaskResolved:
    return ev.TaskResolved(task_id=task, by="h", note="done", at=at)


def returned(task: str = LEAD, at: datetime = T0) -> ev.TaskReturned:
    return ev.TaskReturned(task_id=task, by="h", reason="not ours", at=at)


def closed(on_time: bool = True, at: datetime = T0, reason: str = "verified") -> ev.IssueClosed:
    return ev.IssueClosed(reason=reason, on_time=on_time, closed_at=at)  # type: ignore[arg-type]


def feedback(satisfaction: str = "satisfied") -> ev.FeedbackRecorded:
    return ev.FeedbackRecorded(satisfaction=satisfaction, by="gw")  # type: ignore[arg-type]


# -- the fold under test ---------------------------------------------------------------------------------------
@dataclass
class Given:
    """Stored events folded one by one into one batch; the ``at`` of each is its append time (env.time)."""

    batch: Batch = field(default_factory=lambda: Batch(org=ORG, tz=BJ))
    seq: int = 0
    log: list[Envelope] = field(default_factory=list)

    def __call__(self, *events: ev.Event, at: datetime = T0, issue: str = ISSUE) -> Given:
        for e in events:
            self.seq += 1
            env = Envelope(id=f"{issue}.{self.seq}", source="test", subject=issue, time=at, data=e, actor="tester",
                           seq=self.seq)
            self.log.append(env)
            apply(self.batch, env)
        return self

    def area(self, area: str, day: date | None = None) -> dict[str, int]:
        return self._counts("area", area, day)

    def dept(self, dept: str, day: date | None = None) -> dict[str, int]:
        return self._counts("dept", dept, day)

    def _counts(self, scope: str, key: str, day: date | None) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (d, s, k, metric), n in self.batch.stats.items():
            if s == scope and k == key and (day is None or d == day) and n:
                out[metric] += n
        return dict(out)

    @property
    def issue(self) -> dict[str, Any]:
        return self.batch.issues[ISSUE]

    def task(self, task_id: str) -> dict[str, Any]:
        return self.batch.tasks[task_id]


def in_every_ancestor(g: Given, expected: dict[str, int], chain: list[str] = G1) -> None:
    for area in chain:
        assert g.area(area) == expected, area


def a_dispatched_issue(at: datetime = T0) -> Given:
    """Reported at ``at``, routed to the district, transport leads and the police co-handle, both at ``at``."""
    return Given()(reported(at=at), routed(), dispatched(at=at), dispatched(CO, "dinghai-police", "co", at=at), at=at)


# -- report ----------------------------------------------------------------------------------------------------
def test_a_report_makes_a_row_and_counts_reported_in_the_grid_and_every_ancestor() -> None:
    g = Given()(reported(), at=T0)
    row = g.issue
    assert (row["status"], row["grid"], row["version"], row["seq"], row["level"]) == ("reported", "wuxing-g1", 1, 1,
                                                                                      None)
    assert row["areas"] == G1
    assert row["lead_task"] is row["lead_department"] is row["next_due"] is None
    in_every_ancestor(g, {"reported": 1})
    for other in NOT_ABOVE_G1:
        assert g.area(other) == {}
    assert g.batch.audit == [(1, ISSUE, "issue_reported", "tester", T0, "reported road_damage at wuxing-g1: pothole")]
    assert g.batch.last_seq == 1


def test_counters_fall_on_the_day_in_the_rulebook_timezone() -> None:
    # given a report stored at 23:30 UTC on March 4th, which is 07:30 on March 5th in Beijing
    late = datetime(2025, 3, 4, 23, 30, tzinfo=UTC)
    g = Given()(reported(at=late), at=late)
    # then it counts on March 5th
    assert g.area("city", date(2025, 3, 5)) == {"reported": 1}
    assert g.area("city", date(2025, 3, 4)) == {}


def test_a_report_under_an_unknown_grid_counts_for_that_grid_alone() -> None:
    g = Given()(reported(grid="nowhere"))
    assert g.issue["areas"] == ["nowhere"]
    assert g.area("nowhere") == {"reported": 1}
    assert g.area("city") == {}


def test_events_of_an_issue_never_reported_change_no_rows_but_are_audited() -> None:
    g = Given()(routed(), dispatched())
    assert g.batch.issues == {} and g.batch.tasks == {} and not g.batch.stats
    assert [a[2] for a in g.batch.audit] == ["issue_routed", "task_dispatched"]


def test_a_second_report_of_the_same_issue_changes_nothing() -> None:
    g = Given()(reported(), reported(at=T0 + HOUR))
    assert g.issue["version"] == 1
    in_every_ancestor(g, {"reported": 1})


# -- dispatch --------------------------------------------------------------------------------------------------
def test_dispatch_counts_every_task_per_department_and_the_lead_per_area() -> None:
    g = Given()(reported(), at=T0)(routed(), at=T0)
    g(dispatched(at=T0 + 2 * MIN), dispatched(CO, "dinghai-police", "co", at=T0), at=T0 + 2 * MIN)
    row = g.issue
    assert (row["status"], row["level"], row["owner_area"]) == ("dispatched", "district", "dinghai")
    assert (row["lead_task"], row["lead_department"], row["lead_status"]) == (LEAD, "dinghai-roads", "dispatched")
    assert row["next_due"] == g.task(LEAD)["acknowledge_due"]
    assert row["dispatched_at"] == T0 + 2 * MIN and row["version"] == 4
    assert {t: (g.task(t)["department"], g.task(t)["role"], g.task(t)["status"]) for t in (LEAD, CO)} == {
        LEAD: ("dinghai-roads", "lead", "dispatched"), CO: ("dinghai-police", "co", "dispatched")}
    in_every_ancestor(g, {"reported": 1, "tasks_dispatched": 1, "issues_dispatched": 1, "dispatch_ms_sum": 120_000})
    assert g.dept("dinghai-roads") == {"tasks_dispatched": 1}
    assert g.dept("dinghai-police") == {"tasks_dispatched": 1}


def test_a_second_lead_dispatch_counts_a_task_but_not_a_second_dispatched_issue() -> None:
    g = a_dispatched_issue()(returned(), at=T0 + MIN)
    g(routed(reason="returned"), dispatched(f"{ISSUE}-3", "dinghai-center", at=T0 + 2 * MIN), at=T0 + 2 * MIN)
    assert g.issue["lead_department"] == "dinghai-center"
    assert g.area("city")["issues_dispatched"] == 1
    assert g.area("city")["tasks_dispatched"] == 2
    assert g.area("city").get("dispatch_ms_sum", 0) == 0
    assert g.dept("dinghai-center") == {"tasks_dispatched": 1}


# -- acknowledge -----------------------------------------------------------------------------------------------
def test_an_acknowledgement_on_time_counts_and_moves_the_issue_in_progress() -> None:
    g = a_dispatched_issue()(acked(at=T0 + 10 * MIN), at=T0 + 10 * MIN)
    assert (g.issue["status"], g.issue["lead_status"]) == ("in_progress", "acknowledged")
    assert g.issue["next_due"] == g.task(LEAD)["resolve_due"]
    assert g.task(LEAD)["acknowledged_at"] == T0 + 10 * MIN
    assert g.area("dinghai")["tasks_acknowledged"] == 1 and g.area("dinghai")["tasks_ack_on_time"] == 1
    assert g.dept("dinghai-roads") == {"tasks_dispatched": 1, "tasks_acknowledged": 1, "tasks_ack_on_time": 1,
                                       "tasks_ack_due": 1}


def test_an_acknowledgement_exactly_at_the_deadline_is_on_time() -> None:
    g = a_dispatched_issue()(acked(at=T0 + 30 * MIN), at=T0 + 30 * MIN)
    assert g.dept("dinghai-roads")["tasks_ack_on_time"] == 1


def test_a_late_acknowledgement_counts_as_acknowledged_but_not_on_time() -> None:
    g = a_dispatched_issue()(acked(at=T0 + 31 * MIN), at=T0 + 31 * MIN)
    for area in G1:
        assert g.area(area)["tasks_acknowledged"] == 1
        assert "tasks_ack_on_time" not in g.area(area)
    assert g.dept("dinghai-roads") == {"tasks_dispatched": 1, "tasks_acknowledged": 1, "tasks_ack_due": 1}
    assert rates(g.area("city"))["response_rate"]["value"] == 0.0


def test_a_co_handler_acknowledging_counts_for_its_department_only() -> None:
    g = a_dispatched_issue()(acked(CO, at=T0 + MIN), at=T0 + MIN)
    assert g.issue["status"] == "dispatched"
    assert g.dept("dinghai-police") == {"tasks_dispatched": 1, "tasks_acknowledged": 1, "tasks_ack_on_time": 1,
                                        "tasks_ack_due": 1}
    assert "tasks_acknowledged" not in g.area("city")


# -- resolve, verify, close, feedback --------------------------------------------------------------------------
def test_the_whole_happy_path_counts_every_rate_once() -> None:
    g = a_dispatched_issue()
    g(acked(at=T0 + 5 * MIN), acked(CO, at=T0 + 50 * MIN), at=T0 + 5 * MIN)
    g(resolved(CO, at=T0 + 2 * HOUR), resolved(at=T0 + 3 * HOUR), at=T0 + 3 * HOUR)
    assert (g.issue["status"], g.issue["next_due"], g.issue["lead_status"]) == ("resolved", None, "resolved")
    g(ev.IssueVerified(passed=True, by="gw"), closed(on_time=True, at=T0 + 4 * HOUR), at=T0 + 4 * HOUR)
    g(feedback("satisfied"), at=T0 + 5 * HOUR)
    row = g.issue
    assert (row["status"], row["closed_at"], row["closed_on_time"], row["satisfaction"]) == (
        "closed", T0 + 4 * HOUR, True, "satisfied")
    assert row["version"] == 11
    in_every_ancestor(g, {
        "reported": 1, "issues_dispatched": 1, "tasks_dispatched": 1,
        "tasks_acknowledged": 1, "tasks_ack_on_time": 1, "issues_resolved": 1, "issues_resolve_due": 1,
        "verifications": 1, "closed": 1,
        "closed_on_time": 1, "feedback": 1, "feedback_satisfied": 1, "tasks_ack_due": 1, "tasks_resolve_due": 1})
    assert g.dept("dinghai-roads") == {"tasks_dispatched": 1, "tasks_acknowledged": 1, "tasks_ack_on_time": 1,
                                       "tasks_resolved": 1, "tasks_resolved_on_time": 1, "tasks_ack_due": 1,
                                       "tasks_resolve_due": 1, "feedback": 1,
                                       "feedback_satisfied": 1}  # the feedback of the issue it led
    # the co-handler acknowledged 50 minutes after a 30-minute clock: late
    assert g.dept("dinghai-police") == {"tasks_dispatched": 1, "tasks_acknowledged": 1, "tasks_resolved": 1,
                                        "tasks_resolved_on_time": 1, "tasks_ack_due": 1, "tasks_resolve_due": 1}
    r = rates(g.area("city"))
    assert {k: v["value"] for k, v in r.items()} == {
        "response_rate": 1.0, "resolution_rate": 1.0, "satisfaction_rate": 1.0, "on_time_close_rate": 1.0,
        "rework_rate": 0.0, "return_rate": 0.0, "extension_rate": 0.0,
        "supervision_on_time_rate": None}
    d = rates(g.dept("dinghai-police"), DEPT_RATES)
    assert (d["response_rate"]["value"], d["resolution_rate"]["value"]) == (0.0, 1.0)
    assert [a[0] for a in g.batch.audit] == list(range(1, 12))


def test_a_late_resolution_closes_late_and_the_department_is_not_on_time() -> None:
    g = a_dispatched_issue()(acked(at=T0 + MIN), resolved(at=T0 + 25 * HOUR), at=T0 + 25 * HOUR)
    g(ev.IssueVerified(passed=True, by="gw"), closed(on_time=False, at=T0 + 26 * HOUR), at=T0 + 26 * HOUR)
    assert g.area("city")["closed"] == 1 and "closed_on_time" not in g.area("city")
    assert "tasks_resolved_on_time" not in g.dept("dinghai-roads")
    # the co task still open at the close is superseded
    assert g.task(CO)["status"] == "superseded" and g.task(LEAD)["status"] == "resolved"


def test_a_failed_verification_reopens_supersedes_open_tasks_and_counts_rework() -> None:
    g = a_dispatched_issue()(acked(at=T0 + MIN), resolved(at=T0 + HOUR), at=T0 + HOUR)
    g(ev.IssueVerified(passed=False, by="gw", note="still broken"), ev.IssueReopened(reopen_count=1),
      at=T0 + 2 * HOUR)
    row = g.issue
    assert (row["status"], row["reopen_count"]) == ("reopened", 1)
    assert g.task(CO)["status"] == "superseded"
    in_every_ancestor(g, {"reported": 1, "issues_dispatched": 1, "tasks_dispatched": 1,
                          "tasks_acknowledged": 1, "tasks_ack_on_time": 1, "issues_resolved": 1,
                          "issues_resolve_due": 1,
                          "verifications": 1, "reopened": 1, "tasks_ack_due": 1, "tasks_resolve_due": 1})
    assert rates(g.area("city"))["rework_rate"]["value"] == 1.0


@pytest.mark.parametrize(("satisfaction", "satisfied"),
                         [("satisfied", 1), ("basically_satisfied", 1), ("dissatisfied", 0)])
def test_feedback_counts_once_and_basically_satisfied_is_satisfied(satisfaction: str, satisfied: int) -> None:
    g = a_dispatched_issue()(acked(), resolved(), ev.IssueVerified(passed=True, by="gw"), closed())
    g(feedback(satisfaction))
    assert g.issue["satisfaction"] == satisfaction
    assert g.area("city")["feedback"] == 1
    assert g.area("city").get("feedback_satisfied", 0) == satisfied


def test_a_second_feedback_is_not_counted_twice_and_the_row_shows_the_latest() -> None:
    # current rule: the first feedback is the one counted (满意率); the row shows the latest answer
    g = a_dispatched_issue()(acked(), resolved(), feedback("dissatisfied"), ev.IssueVerified(passed=True, by="gw"),
                             closed(), feedback("satisfied"))
    assert g.issue["satisfaction"] == "satisfied"
    assert (g.area("city")["feedback"], g.area("city").get("feedback_satisfied", 0)) == (1, 0)


def test_resolved_on_site_closes_on_time_without_any_task() -> None:
    g = Given()(reported())(ev.IssueResolvedOnSite(by="gw"), closed(reason="resolved_on_site"), at=T0 + MIN)
    assert (g.issue["status"], g.issue["lead_task"], g.issue["dispatched_at"]) == ("closed", None, None)
    in_every_ancestor(g, {"reported": 1, "closed": 1, "closed_on_time": 1, "resolved_on_site": 1})
    assert g.batch.tasks == {}


# -- return, extension, breach, escalation ---------------------------------------------------------------------
def test_a_lead_return_counts_per_department_and_area_a_co_return_per_department() -> None:
    g = a_dispatched_issue()(returned(at=T0 + MIN), returned(CO, at=T0 + 2 * MIN), at=T0 + 2 * MIN)
    assert (g.task(LEAD)["status"], g.task(LEAD)["returned_at"]) == ("returned", T0 + MIN)
    assert g.issue["status"] == "dispatched" and g.issue["lead_status"] == "returned"
    assert g.issue["next_due"] is None
    in_every_ancestor(g, {"reported": 1, "issues_dispatched": 1, "tasks_dispatched": 1,
                          "tasks_returned": 1})
    assert g.dept("dinghai-roads") == {"tasks_dispatched": 1, "tasks_returned": 1}
    assert g.dept("dinghai-police") == {"tasks_dispatched": 1, "tasks_returned": 1}
    assert rates(g.area("city"))["return_rate"]["value"] == 1.0


def test_an_extension_moves_the_resolve_due_and_counts_once_per_task() -> None:
    g = a_dispatched_issue()(acked())
    new_due = T0 + 48 * HOUR
    g(ev.ExtensionRequested(task_id=LEAD, by="h", extension=24 * HOUR, reason="rain"))
    g(ev.ExtensionApproved(task_id=LEAD, by="sup", resolve_due=new_due, resolve_warn=new_due - HOUR))
    g(ev.ExtensionApproved(task_id=LEAD, by="sup", resolve_due=new_due + HOUR, resolve_warn=new_due))
    assert (g.task(LEAD)["resolve_due"], g.task(LEAD)["extended"]) == (new_due + HOUR, True)
    assert g.issue["next_due"] == new_due + HOUR
    assert g.area("city")["tasks_extended"] == 1 and g.dept("dinghai-roads")["tasks_extended"] == 1
    # resolved after the original due but before the extended one: on time for the department
    g(resolved(at=T0 + 30 * HOUR))
    assert g.dept("dinghai-roads")["tasks_resolved_on_time"] == 1


def test_a_co_extension_counts_for_its_department_only() -> None:
    g = a_dispatched_issue()(ev.ExtensionApproved(task_id=CO, by="sup", resolve_due=T0 + 48 * HOUR,
                                                  resolve_warn=T0 + 40 * HOUR))
    assert g.dept("dinghai-police")["tasks_extended"] == 1
    assert "tasks_extended" not in g.area("city")


def test_breaches_mark_the_task_and_count_per_department_and_for_the_lead_per_area() -> None:
    g = a_dispatched_issue()
    due = g.task(LEAD)["acknowledge_due"]
    g(ev.SlaWarned(task_id=LEAD, clock="acknowledge", due=due), at=T0 + 24 * MIN)
    g(ev.SlaBreached(task_id=LEAD, clock="acknowledge", due=due), ev.SlaBreached(task_id=CO, clock="acknowledge",
                                                                                  due=due), at=T0 + 30 * MIN)
    g(ev.SlaBreached(task_id=LEAD, clock="resolve", due=g.task(LEAD)["resolve_due"]), at=T0 + 24 * HOUR)
    assert g.task(LEAD)["breached"] == "acknowledge,resolve"
    assert g.task(CO)["breached"] == "acknowledge"
    assert g.dept("dinghai-roads") == {"tasks_dispatched": 1, "sla_warned": 1, "sla_breached": 2, "tasks_ack_due": 1,
                                       "tasks_resolve_due": 1}
    assert g.dept("dinghai-police") == {"tasks_dispatched": 1, "sla_breached": 1, "tasks_ack_due": 1}
    for area in G1:
        assert g.area(area)["sla_breached"] == 2
        assert "sla_warned" not in g.area(area)
    # the resolve breach happened the next day (Beijing time)
    assert g.area("city", date(2025, 3, 5)) == {"sla_breached": 1, "tasks_resolve_due": 1, "issues_resolve_due": 1}


def test_an_escalation_supersedes_and_hands_the_lead_to_the_upper_level() -> None:
    g = a_dispatched_issue()
    g(ev.IssueEscalated(from_level="district", to_level="city", cause="acknowledge_breach"),
      routed("city", "city", "escalated"), ev.TaskSuperseded(task_id=LEAD, reason="escalated"),
      ev.TaskSuperseded(task_id=CO, reason="escalated"), dispatched(f"{ISSUE}-3", "city-center", level="city"),
      at=T0 + 31 * MIN)
    row = g.issue
    assert (row["level"], row["owner_area"], row["escalations"]) == ("city", "city", 1)
    assert (row["lead_department"], row["lead_status"], row["status"]) == ("city-center", "dispatched", "dispatched")
    assert g.task(LEAD)["status"] == g.task(CO)["status"] == "superseded"
    in_every_ancestor(g, {"reported": 1, "issues_dispatched": 1, "tasks_dispatched": 2,
                          "escalated": 1})


def test_urges_count_against_the_lead_department_and_extension_requests_only_bump_the_version() -> None:
    g = a_dispatched_issue()
    before = Counter(g.batch.stats)
    g(ev.IssueUrged(by="sup", note="hurry"), ev.ExtensionRequested(task_id=LEAD, by="h", extension=HOUR, reason="r"))
    added = Counter(g.batch.stats) - before
    assert {k[1:] for k in added} == {("dept", g.task(LEAD)["department"], "urged")} | {
        ("area", a, "urged") for a in ("city", "dinghai", "huannan", "wuxing", "wuxing-g1")}
    assert g.issue["version"] == 6 and g.issue["seq"] == 6
    assert [a[2] for a in g.batch.audit[-2:]] == ["issue_urged", "extension_requested"]


# -- batches ---------------------------------------------------------------------------------------------------
def _story() -> Given:
    g = a_dispatched_issue()
    g(acked(at=T0 + 40 * MIN), at=T0 + 40 * MIN)(resolved(at=T0 + 2 * HOUR), at=T0 + 2 * HOUR)
    g(ev.IssueVerified(passed=False, by="gw"), ev.IssueReopened(reopen_count=1), at=T0 + 3 * HOUR)
    g(routed(reason="reopened"), dispatched(f"{ISSUE}-3", at=T0 + 3 * HOUR), at=T0 + 3 * HOUR)
    g(returned(f"{ISSUE}-3", at=T0 + 20 * HOUR), at=T0 + 20 * HOUR)
    g(routed(reason="returned"), dispatched(f"{ISSUE}-4", "dinghai-center", at=T0 + 20 * HOUR), at=T0 + 20 * HOUR)
    g(acked(f"{ISSUE}-4", at=T0 + 21 * HOUR), resolved(f"{ISSUE}-4", at=T0 + 22 * HOUR), at=T0 + 22 * HOUR)
    g(ev.IssueVerified(passed=True, by="gw"), closed(True, T0 + 23 * HOUR), feedback("basically_satisfied"),
      at=T0 + 23 * HOUR)
    return g


@pytest.mark.parametrize("cut", range(1, 20))
def test_folding_in_two_batches_equals_folding_in_one(cut: int) -> None:
    """The worker folds each batch on the rows the previous ones left: counters add up to the same totals."""
    whole = _story()
    first, second = Batch(org=ORG, tz=BJ), Batch(org=ORG, tz=BJ)
    for env in whole.log[:cut]:
        apply(first, env)
    second.load([dict(v) for v in first.issues.values()], [dict(v) for v in first.tasks.values()])
    for env in whole.log[cut:]:
        apply(second, env)
    assert second.issues == whole.batch.issues
    assert second.tasks == whole.batch.tasks
    assert +(first.stats + second.stats) == +whole.batch.stats
    assert first.audit + second.audit == whole.batch.audit


def test_the_rows_agree_with_the_issue_aggregate_after_a_long_story() -> None:
    g = _story()
    state = fold(ISSUE, [(e.data, e.seq) for e in g.log])
    row = g.issue
    assert (row["status"], row["level"], row["reopen_count"], row["version"]) == (
        state.status, state.level, state.reopen_count, state.version)
    assert state.lead is not None and row["lead_department"] == state.lead.department
    assert {t.id: t.status for t in state.tasks} == {k: v["status"] for k, v in g.batch.tasks.items()}


@pytest.mark.parametrize("before", [[acked()], [acked(), resolved()]], ids=["in_progress", "resolved"])
def test_a_new_lead_after_an_escalation_shows_the_issue_dispatched_like_the_aggregate(before: list[ev.Event]
                                                                                      ) -> None:
    # given the lead acknowledged (in progress) or resolved (awaiting verification); a supervisor then escalates
    # and the router dispatches the city's command centre: the new lead has not acknowledged yet
    g = a_dispatched_issue()(*before)
    g(ev.IssueEscalated(from_level="district", to_level="city", cause="requested", by="sup"),
      routed("city", "city", "escalated"), ev.TaskSuperseded(task_id=CO, reason="escalated"),
      dispatched(f"{ISSUE}-3", "city-center", level="city"))
    state = fold(ISSUE, [(e.data, e.seq) for e in g.log])
    assert state.status == "dispatched"
    assert (g.issue["status"], g.issue["lead_status"], g.issue["lead_department"]) == (
        state.status, "dispatched", "city-center")


# -- rates -----------------------------------------------------------------------------------------------------
def test_rates_give_none_without_a_denominator_and_four_decimals_otherwise() -> None:
    r = rates({"tasks_ack_on_time": 1, "tasks_ack_due": 3, "tasks_dispatched": 5})
    assert r["response_rate"] == {"value": 0.3333, "numerator": 1, "denominator": 3,
                                  "counts": ["tasks_ack_on_time", "tasks_ack_due"]}
    assert r["satisfaction_rate"]["value"] is None
    assert set(r) == set(RATES) and set(rates({}, DEPT_RATES)) == set(DEPT_RATES)
    for num, den in [*RATES.values(), *DEPT_RATES.values()]:
        assert num in METRICS and den in METRICS


def test_every_rate_stays_within_zero_and_one_after_rework() -> None:
    """解决率 = issues_resolved / issues_dispatched: an issue resolved, reopened (返工) and resolved again is still
    one resolved issue out of one dispatched."""
    g = _story()
    for name, r in rates(g.area("city")).items():
        assert r["value"] is None or 0 <= r["value"] <= 1, (name, r)
    for name, r in rates(g.dept("dinghai-roads"), DEPT_RATES).items():
        assert r["value"] is None or 0 <= r["value"] <= 1, (name, r)
    assert g.area("city")["issues_resolved"] == 1


def test_an_issue_escalated_after_its_lead_resolved_counts_as_resolved_once() -> None:
    g = a_dispatched_issue()(acked(), resolved())
    g(ev.IssueEscalated(from_level="district", to_level="city", cause="requested", by="sup"),
      routed("city", "city", "escalated"), ev.TaskSuperseded(task_id=CO, reason="escalated"),
      dispatched(f"{ISSUE}-3", "city-center", level="city"))
    g(acked(f"{ISSUE}-3"), resolved(f"{ISSUE}-3"), ev.IssueVerified(passed=True, by="gw"), closed())
    assert (g.area("city")["issues_dispatched"], g.area("city")["issues_resolved"]) == (1, 1)
    assert rates(g.area("city"))["resolution_rate"]["value"] == 1.0



def test_the_residents_own_answer_takes_precedence_over_the_grid_workers() -> None:
    g = a_dispatched_issue()
    g(acked(at=T0 + 5 * MIN), resolved(at=T0 + HOUR), at=T0 + HOUR)
    g(feedback("satisfied"), at=T0 + 2 * HOUR)  # the worker, by phone
    assert g.issue["feedback_source"] == "grid_worker_phone"
    g(ev.ResidentFeedbackRecorded(solved=False, satisfaction="dissatisfied", at=T0 + 3 * HOUR), at=T0 + 3 * HOUR)
    g(feedback("satisfied"), at=T0 + 4 * HOUR)  # the worker again: the resident's answer stands
    assert (g.issue["satisfaction"], g.issue["feedback_source"]) == ("dissatisfied", "resident")
    city = g.area("city")
    assert (city.get("feedback"), city.get("feedback_satisfied", 0)) == (1, 0)
    assert city.get("issues_resolved", 0) == 0 and city["resident_unsolved"] == 1  # the resident: not solved
    roads = g.dept("dinghai-roads")
    assert (roads["feedback"], roads.get("feedback_satisfied", 0), roads.get("tasks_resolved", 0)) == (1, 0, 0)


def test_fair_rates_judge_a_clock_once_and_never_before_it_is_due() -> None:
    # issue 19: a department showed a red 33.3 % with nothing overdue, and co-handlers replaced within seconds a 0 %
    g = a_dispatched_issue()
    assert rates(g.dept("dinghai-roads"), DEPT_RATES)["response_rate"]["denominator"] == 0  # not yet due
    g(ev.TaskSuperseded(task_id=CO, reason="escalated"), at=T0 + MIN)  # superseded before its clock ran out
    g(ev.SlaBreached(task_id=LEAD, clock="acknowledge", due=T0 + 30 * MIN), at=T0 + 30 * MIN)
    g(acked(at=T0 + 40 * MIN), at=T0 + 40 * MIN)  # late, after the breach: judged once, at the breach
    assert rates(g.dept("dinghai-police"), DEPT_RATES)["response_rate"]["denominator"] == 0
    r = rates(g.dept("dinghai-roads"), DEPT_RATES)["response_rate"]
    assert (r["numerator"], r["denominator"], r["value"]) == (0, 1, 0.0)
    assert rates(g.area("city"))["response_rate"]["denominator"] == 1


def test_the_area_resolution_rate_judges_an_issue_once_when_its_lead_is_due() -> None:
    """The area's 解决率 = issues_resolved / issues_resolve_due: an issue enters the denominator once, at its first
    lead resolution or the first resolve breach of a lead before it; not yet due, it is in neither."""
    g = a_dispatched_issue()
    assert rates(g.area("city"))["resolution_rate"]["denominator"] == 0  # dispatched, not yet due
    g(ev.SlaBreached(task_id=LEAD, clock="resolve", due=g.task(LEAD)["resolve_due"]), at=T0 + 24 * HOUR)
    g(ev.IssueEscalated(from_level="district", to_level="city", cause="resolve_breach"),
      routed("city", "city", "escalated"), ev.TaskSuperseded(task_id=LEAD, reason="escalated"),
      ev.TaskSuperseded(task_id=CO, reason="escalated"), dispatched(f"{ISSUE}-3", "city-center", level="city"),
      at=T0 + 24 * HOUR)
    r = rates(g.area("city"))["resolution_rate"]
    assert (r["numerator"], r["denominator"]) == (0, 1)
    g(acked(f"{ISSUE}-3"), resolved(f"{ISSUE}-3"), at=T0 + 25 * HOUR)  # late, at the city: counted once
    r = rates(g.area("city"))["resolution_rate"]
    assert (r["numerator"], r["denominator"], r["value"]) == (1, 1, 1.0)


def test_an_urge_naming_a_task_and_a_missed_progress_report_count_against_their_departments() -> None:
    g = a_dispatched_issue()(ev.IssueUrged(by="sup", task_id=CO), ev.IssueUrged(by="sup"),
                             ev.ProgressMissed(task_id=LEAD, due=T0 + HOUR))
    assert (g.dept("dinghai-police")["urged"], g.dept("dinghai-roads")["urged"]) == (1, 1)
    assert g.dept("dinghai-roads")["progress_missed"] == 1 and g.area("city")["progress_missed"] == 1


def test_the_row_knows_whether_anonymous_readers_see_the_description() -> None:
    # the reporter's mark, then a moderator's decisions (anonymous Open311 lists read description_public)
    g = Given()(reported())
    assert g.issue["description_public"] is False
    g(ev.DescriptionPublicationChanged(public=True, by="sup", reason="无个人信息"))
    assert g.issue["description_public"] is True and g.issue["version"] == 2
    g(ev.DescriptionPublicationChanged(public=False, by="sup"))
    assert g.issue["description_public"] is False
    marked = Given()(ev.IssueReported(grid="wuxing-g1", category="road_damage", title="pothole", reporter="gw",
                                      reported_at=T0, description_public=True))
    assert marked.issue["description_public"] is True
    # the reason is not in the audit summary
    assert all("无个人信息" not in row[5] for row in g.batch.audit), g.batch.audit
