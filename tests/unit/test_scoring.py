"""考核 (shared/domain/scoring.py): given a fixture history of stored events folded by the projection
(services/projections/model.py) into day counters, when a month is scored, then each score equals the hand
computation below; the rules are those in force in the month; a bad ``scoring:`` section names its path."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.projections.model import Batch, apply
from shared.config import ConfigError, load_org, parse_rulebook
from shared.domain import scoring
from shared.events import models as ev
from shared.events.codec import Envelope

ROOT = Path(__file__).resolve().parents[2]
ORG = load_org(ROOT / "tests/fixtures/contract_org.yaml")
BJ = ZoneInfo("Asia/Shanghai")
MIN, HOUR = timedelta(minutes=1), timedelta(hours=1)
BASE_RULES = (ROOT / "tests/fixtures/contract_rules.yaml").read_text()
RULES = BASE_RULES + """
scoring:
  weights: {response_rate: 30, resolution_rate: 35, satisfaction_rate: 35}
  deductions: {overdue: 1, rework: 2, rejected_return: 1, urge: 0.5, supervision: 3}
  caps: {urge: 5, total: 30}
"""


def bj(day: str, hm: str = "10:00") -> datetime:
    return datetime.fromisoformat(f"{day}T{hm}").replace(tzinfo=BJ).astimezone(UTC)


class History:
    def __init__(self) -> None:
        self.batch = Batch(org=ORG, tz=BJ)
        self.seq = 0

    def __call__(self, issue: str, at: datetime, *events: ev.Event) -> None:
        for e in events:
            self.seq += 1
            apply(self.batch, Envelope(id=f"{issue}.{self.seq}", source="t", subject=issue, time=at, data=e,
                                       seq=self.seq))

    def days(self, scope: str) -> list[tuple[object, str, str, int]]:
        return [(d, k, m, n) for (d, s, k, m), n in self.batch.stats.items() if s == scope]


def reported(grid: str, at: datetime) -> ev.IssueReported:
    return ev.IssueReported(grid=grid, category="road_damage", title="t", reporter="gw", reported_at=at)


def dispatched(task: str, dept: str, at: datetime) -> ev.TaskDispatched:
    return ev.TaskDispatched(task_id=task, department=dept, role="lead", level="district", clock="natural",
                             dispatched_at=at, acknowledge_due=at + 30 * MIN, resolve_due=at + 24 * HOUR,
                             acknowledge_warn=at + 24 * MIN, resolve_warn=at + 19 * HOUR)


def routed() -> ev.IssueRouted:
    return ev.IssueRouted(level="district", owner_area="dinghai", reason="reported", rule="r", rulebook_version="v")


def history() -> History:
    """November 2026 (Beijing): issues A, B, D; issue C belongs to October."""
    h = History()
    # A at wuxing-g1, roads: on-time ack, resolved, 返工 (reopen), again late (breach), resolved, closed;
    # the worker heard 满意 by phone, then the resident answered 不满意 (solved) through the link
    t = bj("2026-11-02")
    h("A", t, reported("wuxing-g1", t), routed(), dispatched("A-1", "dinghai-roads", t))
    h("A", t + 10 * MIN, ev.TaskAcknowledged(task_id="A-1", by="h", at=t + 10 * MIN))
    h("A", bj("2026-11-03"), ev.TaskResolved(task_id="A-1", by="h", at=bj("2026-11-03")))
    h("A", bj("2026-11-04"), ev.IssueVerified(passed=False, by="gw"), ev.IssueReopened(reopen_count=1))
    t = bj("2026-11-05")
    h("A", t, dispatched("A-3", "dinghai-roads", t))
    h("A", t + HOUR, ev.SlaBreached(task_id="A-3", clock="acknowledge", due=t + 30 * MIN),
      ev.TaskAcknowledged(task_id="A-3", by="h", at=t + HOUR))
    h("A", bj("2026-11-06"), ev.TaskResolved(task_id="A-3", by="h", at=bj("2026-11-06")),
      ev.IssueVerified(passed=True, by="gw"), ev.IssueClosed(reason="verified", on_time=True,
                                                            closed_at=bj("2026-11-06")))
    h("A", bj("2026-11-07"), ev.FeedbackRecorded(satisfaction="satisfied", by="gw"))
    h("A", bj("2026-11-08"), ev.ResidentFeedbackRecorded(solved=True, satisfaction="dissatisfied",
                                                          at=bj("2026-11-08")))
    # B at wuxing-g2, police: late ack (breach), urged twice, resolved, closed, worker: 基本满意
    t = bj("2026-11-10")
    h("B", t, reported("wuxing-g2", t), routed(), dispatched("B-1", "dinghai-police", t))
    h("B", t + HOUR, ev.SlaBreached(task_id="B-1", clock="acknowledge", due=t + 30 * MIN),
      ev.IssueUrged(by="sup"), ev.IssueUrged(by="sup"), ev.TaskAcknowledged(task_id="B-1", by="h", at=t + HOUR))
    h("B", bj("2026-11-11"), ev.TaskResolved(task_id="B-1", by="h", at=bj("2026-11-11")),
      ev.IssueVerified(passed=True, by="gw"), ev.IssueClosed(reason="verified", on_time=True,
                                                            closed_at=bj("2026-11-11")),
      ev.FeedbackRecorded(satisfaction="basically_satisfied", by="gw"))
    # C at wuxing-g1, roads, in October (31st, Beijing): not November's
    t = bj("2026-10-31", "23:00")
    h("C", t, reported("wuxing-g1", t), routed(), dispatched("C-1", "dinghai-roads", t),
      ev.SlaBreached(task_id="C-1", clock="acknowledge", due=t + 30 * MIN))
    # D at wuxing-g1, roads: on time, resolved; the resident says NOT solved, 不满意 (the worker never called)
    t = bj("2026-11-20")
    h("D", t, reported("wuxing-g1", t), routed(), dispatched("D-1", "dinghai-roads", t),
      ev.TaskAcknowledged(task_id="D-1", by="h", at=t + 5 * MIN))
    h("D", bj("2026-11-21"), ev.TaskResolved(task_id="D-1", by="h", at=bj("2026-11-21")))
    h("D", bj("2026-11-22"), ev.ResidentFeedbackRecorded(solved=False, satisfaction="dissatisfied",
                                                          at=bj("2026-11-22")))
    return h


NOV = scoring.month("2026-11", BJ)


def test_departments_of_a_month_equal_the_hand_computation() -> None:
    rules = parse_rulebook(RULES).scoring
    counts = scoring.sum_days(history().days("dept"), NOV)
    ranked = scoring.scores(counts, rules, "department")
    by_id = {r["id"]: r for r in ranked}
    # roads: tasks, D-1 (C-1 is October's); on time: A-1, D-1 -> 30 x 2/3 = 20
    # resolved 3, minus D (the resident: not solved) -> 35 x 2/3 = 23.3333
    # feedback: A (the resident's 不满意 replaces the worker's 满意), D (不满意) -> 35 x 0/2 = 0
    # deductions: overdue 1 x 1 + rework 1 (A) x 2 = 3  -> 43.3333 - 3 = 40.33
    roads = by_id["dinghai-roads"]
    assert roads["rates"]["response_rate"] | {} == {"value": 0.6667, "numerator": 2, "denominator": 3,
                                                    "weight": 30.0, "points": 20.0}
    assert (roads["rates"]["resolution_rate"]["numerator"], roads["rates"]["resolution_rate"]["denominator"]) == (2, 3)
    assert (roads["rates"]["satisfaction_rate"]["numerator"],
            roads["rates"]["satisfaction_rate"]["denominator"]) == (0, 2)
    assert roads["deductions"]["overdue"]["count"] == 1 and roads["deductions"]["rework"]["count"] == 1
    assert roads["deducted"] == 3.0
    assert roads["score"] == 40.33
    # police: B-1 late (0/1 -> 0), resolved 1/1 -> 35, 基本满意 1/1 -> 35; overdue 1 x 1 + urge 2 x 0.5 -> 68
    police = by_id["dinghai-police"]
    assert police["deductions"]["urge"] == {"count": 2, "per_item": 0.5, "cap": 5.0, "deducted": 1.0}
    assert police["score"] == 68.0
    assert [(r["id"], r["rank"]) for r in ranked] == [("dinghai-police", 1), ("dinghai-roads", 2)]


def test_an_area_of_a_month_equals_the_hand_computation() -> None:
    rules = parse_rulebook(RULES).scoring
    counts = scoring.sum_days(history().days("area"), NOV)
    wuxing = scoring.scores({"wuxing": counts["wuxing"]}, rules, "area")[0]
    # lead tasks, B-1, D-1; on time A-1, D-1 -> 30 x 2/4 = 15
    # issues dispatched A, B, D; resolved A, B (D: the resident says not) -> 35 x 2/3 = 23.3333
    # feedback A, B, D; satisfied B only -> 35 x 1/3 = 11.6667; deductions: 2 breaches + 1 rework x 2 + 2 urges
    # x 0.5 = 5 -> 50 - 5 = 45
    assert wuxing["earned"] == 50.0 and wuxing["deducted"] == 5.0 and wuxing["score"] == 45.0
    # October holds C only: dispatched, never acknowledged (30 x 0/1), not resolved (35 x 0/1), no feedback yet
    # (nothing to judge: the full 35), one breach -> 35 - 1
    oct_counts = scoring.sum_days(history().days("area"), scoring.month("2026-10", BJ))
    assert scoring.scores({"wuxing": oct_counts["wuxing"]}, rules, "area")[0]["score"] == 34.0


def test_caps_bound_each_item_and_the_total() -> None:
    rules = parse_rulebook(BASE_RULES + "scoring:\n  deductions: {urge: 1, overdue: 10}\n"
                           "  caps: {urge: 3, total: 25}\n").scoring
    s = scoring.score({"urged": 10, "sla_breached": 2}, rules, scoring.AREA_RATES)
    assert s["deductions"]["urge"]["deducted"] == 3.0  # 10 x 1, capped at 3
    assert s["deductions"]["overdue"]["deducted"] == 20.0
    assert s["deducted"] == 23.0 and s["score"] == 77.0  # 3 + 20 = 23, under the total cap of 25
    s = scoring.score({"urged": 10, "sla_breached": 3}, rules, scoring.AREA_RATES)
    assert s["deducted"] == 25.0  # 3 + 30 = 33, capped at 25


def test_the_rules_version_is_pinned_per_month() -> None:
    v1 = parse_rulebook(BASE_RULES + "version: v1\nscoring:\n  weights: {response_rate: 50, resolution_rate: 50}\n")
    v2 = parse_rulebook(BASE_RULES + "version: v2\nscoring:\n  weights: {response_rate: 100}\n")
    hist = [(bj("2026-10-01", "00:00"), v1), (bj("2026-11-15"), v2)]
    assert scoring.rules_in_force(hist, scoring.month("2026-09", BJ)).version == "v1"  # before any: the first
    assert scoring.rules_in_force(hist, scoring.month("2026-10", BJ)).version == "v1"
    assert scoring.rules_in_force(hist, scoring.month("2026-11", BJ)).version == "v2"  # in force in November
    assert scoring.rules_in_force(hist, scoring.month("2026-12", BJ)).version == "v2"
    # published at the very start of December: November keeps v2, not v3
    v3 = parse_rulebook(BASE_RULES + "version: v3\n")
    hist.append((scoring.month("2026-12", BJ).start, v3))
    assert scoring.rules_in_force(hist, NOV).version == "v2"
    counts = scoring.sum_days(history().days("dept"), NOV)
    roads_v1 = scoring.score(counts["dinghai-roads"], v1.scoring, scoring.DEPT_RATES)
    roads_v2 = scoring.score(counts["dinghai-roads"], v2.scoring, scoring.DEPT_RATES)
    assert (roads_v1["earned"], roads_v2["earned"]) == (66.6667, 66.6667)  # 50x2/3+50x2/3; 100x2/3
    assert roads_v1["full_marks"] == roads_v2["full_marks"] == 100.0


def test_months_are_calendar_months_in_the_timezone() -> None:
    p = scoring.month("2026-12", BJ)
    assert p.start == datetime(2026, 12, 1, tzinfo=BJ) and p.end == datetime(2027, 1, 1, tzinfo=BJ)
    assert [m.name for m in scoring.previous_months(p, 3, BJ)] == ["2026-10", "2026-11", "2026-12"]
    for bad in ("2026-13", "2026-1", "26-11", "2026/11", "0000-01"):
        with pytest.raises(ValueError):
            scoring.month(bad, BJ)


@pytest.mark.parametrize(("section", "path"), [
    ("scoring:\n  weights: {respons_rate: 30}\n", "scoring.weights.respons_rate"),
    ("scoring:\n  deductions: {urge: -1}\n", "scoring.deductions.urge"),
    ("scoring:\n  caps: {everything: 1}\n", "scoring.caps.everything"),
    ("scoring:\n  weights: {response_rate: 0}\n", "scoring.weights"),
    ("scoring:\n  weight: {}\n", "scoring"),
])
def test_a_bad_scoring_section_names_its_path(section: str, path: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_rulebook(BASE_RULES + section, "rules.yaml")
    assert path in str(exc.value)


def test_a_unit_without_work_is_listed_last_unranked_and_ties_share_a_rank() -> None:
    rules = parse_rulebook(RULES).scoring
    ranked = scoring.scores({"idle": {}, "b": {"urged": 2}, "a": {"urged": 2}, "c": {"urged": 4}}, rules, "area")
    assert [(r["id"], r["rank"], r["score"]) for r in ranked] == [
        ("a", 1, 99.0), ("b", 1, 99.0), ("c", 3, 98.0), ("idle", None, None)]


def test_rejected_returns_and_supervision_orders_are_deducted_from_the_events() -> None:
    h = History()
    t = bj("2026-11-12")
    h("E", t, reported("wuxing-g1", t), routed(), dispatched("E-1", "dinghai-roads", t),
      ev.ReturnRequested(task_id="E-1", by="h", reason="not ours", at=t + MIN),
      ev.ReturnRejected(task_id="E-1", by="cc", reason="it is yours"),
      ev.SupervisionOrdered(task_id="E-1", by="sup", due=t + 48 * HOUR, reason="督办", remind_every=24 * HOUR,
                            at=t + 2 * MIN))
    rules = parse_rulebook(RULES).scoring
    roads = scoring.scores(scoring.sum_days(h.days("dept"), NOV), rules, "department")[0]
    assert roads["deductions"]["rejected_return"] | {"cap": None} == {"count": 1, "per_item": 1.0, "cap": None,
                                                                      "deducted": 1.0}
    assert roads["deductions"]["supervision"]["count"] == 1 and roads["deductions"]["supervision"]["deducted"] == 3.0
    assert roads["deducted"] == 4.0  # nothing due yet: the rates earn their full weight, 100 - 4
    assert roads["score"] == 96.0
