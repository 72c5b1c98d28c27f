"""The pure core of household visits (组团式服务): the org's households, the rulebook's coverage target,
the household HMAC, the visit decider, the read-model fold and the coverage roll-up."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.projections.model import Batch, apply, visits_named
from shared.config import ConfigError, load_org, parse_org, parse_rulebook
from shared.domain import visits as dv
from shared.domain.errors import Conflict, Invalid
from shared.events import models as ev
from shared.events.codec import Envelope

ROOT = Path(__file__).resolve().parents[2]
ORG = load_org(ROOT / "tests/fixtures/visits_org.yaml")
T0 = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
SECRET = b"s" * 64


def test_grids_declare_households_and_the_demo_org_declares_every_grid() -> None:
    assert ORG.areas["wuxing-g1"].households == 4 and ORG.areas["tanfeng-g2"].households is None
    demo = load_org(ROOT / "deploy/org/zhoushan.yaml")
    assert demo.areas["zhanmao-g33"].households == 128
    assert all(100 <= (g.households or 0) <= 150 for g in demo.grids_under(demo.root.id))
    assert demo.department_of_kind("zhanmao-g33", "grid_team") is not None


@pytest.mark.parametrize(("line", "problem"), [
    ("{id: c, name: C, level: city, households: 3}", "only a grid declares households"),
    ("{id: g, name: G, level: grid, households: -1}", "whole number >= 0"),
    ("{id: g, name: G, level: grid, households: 2.5}", "whole number >= 0"),
    ("{id: g, name: G, level: grid, households: many}", "expected a number"),
])
def test_bad_households_are_refused(line: str, problem: str) -> None:
    text = "areas:\n  - " + line + "\n" if "city" in line else \
        "areas:\n  - {id: c, name: C, level: city}\n  - " + line.replace("}", ", parent: c}") + "\n"
    with pytest.raises(ConfigError, match=problem):
        parse_org(text)


def test_rulebook_coverage_defaults_and_is_checked() -> None:
    base = "categories:\n  a: {name: A, start: grid, sla: {acknowledge: PT1H, resolve: PT2H}}\n"
    assert parse_rulebook(base).coverage == dv_coverage(0.9, 30)
    assert parse_rulebook(base + "coverage: {target: 0.8, period: P7D}\n").coverage == dv_coverage(0.8, 7)
    with pytest.raises(ConfigError, match=r"coverage\.target"):
        parse_rulebook(base + "coverage: {target: 1.5}\n")
    with pytest.raises(ConfigError, match=r"coverage\.period"):
        parse_rulebook(base + "coverage: {period: PT0S}\n")


def dv_coverage(target: float, days: int) -> object:
    from shared.config.rulebook import Coverage

    return Coverage(target, timedelta(days=days))


def test_the_household_digest_counts_one_door_once_and_hides_it() -> None:
    a = dv.household_digest(SECRET, "g1", "3-201")
    assert a == dv.household_digest(SECRET, "g1", "  3-201 ") == dv.household_digest(SECRET, "g1", "3-201".upper())
    assert a != dv.household_digest(SECRET, "g2", "3-201")  # another grid's register
    assert a != dv.household_digest(b"t" * 64, "g1", "3-201")  # without the secret it cannot be recomputed
    assert "3-201" not in a and len(a) == 64


def test_the_decider_checks_kind_campaign_and_time() -> None:
    cmd = dv.RecordVisit(grid="g1", household="ab", kind="routine", by="gw")
    (e,) = dv.decide_visit(False, cmd, T0)
    assert e.visited_at == T0 and e.kind == "routine"
    with pytest.raises(Conflict):
        dv.decide_visit(True, cmd, T0)
    with pytest.raises(Invalid, match="names its campaign"):
        dv.decide_visit(False, dv.RecordVisit(grid="g1", household="ab", kind="campaign", by="gw"), T0)
    with pytest.raises(Invalid, match="only a visit of kind campaign"):
        dv.decide_visit(False, dv.RecordVisit(grid="g1", household="ab", kind="routine", by="gw", campaign="c"), T0)
    with pytest.raises(Invalid, match="future"):
        dv.decide_visit(False, dv.RecordVisit(grid="g1", household="ab", kind="routine", by="gw",
                                              visited_at=T0 + timedelta(hours=1)), T0)


def test_visit_ids_come_from_the_key_or_are_random() -> None:
    assert dv.visit_id("gw", "k", 0, 0) == dv.visit_id("gw", "k", 1, 1) != dv.visit_id("other", "k", 0, 0)
    assert dv.visit_id("gw", None, 1, 2).startswith("v") and len(dv.visit_id("gw", None, 1, 2)) == 26


def _env(subject: str, data: ev.Event, seq: int) -> Envelope:
    return Envelope(id=f"{subject}.1", source="t", subject=subject, time=T0, data=data, seq=seq)


def test_the_fold_keeps_visits_and_links_the_reports_that_name_them() -> None:
    b = Batch(org=ORG, tz=ZoneInfo("Asia/Shanghai"))
    v = ev.VisitRecorded(grid="wuxing-g1", household="ab", kind="routine", visited_at=T0, by="gw", issues=("i0",))
    r = ev.IssueReported(grid="wuxing-g1", category="c", title="t", reporter="gw", reported_at=T0, visit="v1")
    envs = [_env("v1", v, 1), _env("i1", r, 2), _env("v1", v, 3)]  # a redelivered visit changes nothing
    for e in envs:
        apply(b, e)
    row = b.visits["v1"]
    assert row["issues"] == ["i0", "i1"] and row["areas"] == ["wuxing-g1", "wuxing", "huannan", "dinghai", "city"]
    assert visits_named(envs) == {"v1"}
    assert b.audit[0][5] == "routine visit at wuxing-g1"  # the audit never holds the household
    assert "reported" not in {k[3] for k in b.stats if k[2] == "v1"}


def test_coverage_rolls_grids_up_by_area() -> None:
    counts = {"wuxing-g1": {"visited": 4, "visits": 5, "issues_raised": 2, "issues_resolved": 1},
              "tanfeng-g2": {"visited": 2, "visits": 2, "issues_raised": 0, "issues_resolved": 0}}
    out = dv.coverage_rows(ORG, "huannan", counts, 0.9)
    grids = {g["grid"]: g for g in out["grids"]}
    assert grids["wuxing-g1"]["rate"] == 1.0 and grids["wuxing-g2"]["rate"] == 0.0
    assert grids["tanfeng-g2"]["rate"] is None and not grids["tanfeng-g2"]["below_target"]  # no households
    areas = {a["id"]: a for a in out["areas"]}
    assert (areas["huannan"]["households"], areas["huannan"]["visited"], areas["huannan"]["rate"]) == (9, 6, 0.4444)
    assert areas["wuxing"]["rate"] == round(4 / 7, 4) and areas["wuxing"]["issues_resolved"] == 1
    assert [x["grid"] for x in out["below_target"]] == ["tanfeng-g1", "wuxing-g2"]
    assert out["total"] == {k: v for k, v in areas["huannan"].items() if k not in ("id", "name", "level", "parent")}
