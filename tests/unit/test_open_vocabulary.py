"""Any city, one topology: an invented city's org and rulebook (tests/fixtures/anycity_*.yaml) load with kinds of
their own, route by the walk up to an ancestor's department, record what nothing serves, and are checked against
each other (shared/config/crosscheck.py) instead of against a list of kinds. Pure: no server."""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.projections.model import Batch, apply
from services.router.reactions import RouterRules, react
from services.router.routing import plan_escalation, plan_route, start_level
from shared.config import ConfigError, load_org, load_rulebook, parse_org, parse_rulebook
from shared.config.crosscheck import check_against_org, configuration_gaps, cross_check, render_report
from shared.domain import commands as cmd
from shared.domain.calendar import WorkCalendar
from shared.domain.clocks import SlaClocks
from shared.domain.issue import decide, fold
from shared.domain.levels import Level
from shared.events import models as ev
from shared.events.codec import Envelope

ROOT = Path(__file__).resolve().parents[2]
ORG_FILE, RULES_FILE = ROOT / "tests/fixtures/anycity_org.yaml", ROOT / "tests/fixtures/anycity_rules.yaml"
ORG, RULES = load_org(ORG_FILE), load_rulebook(RULES_FILE)
DEMO_ORG = load_org(ROOT / "deploy/org/zhoushan.yaml")
T0 = datetime(2025, 3, 4, 2, 0, tzinfo=UTC)


def line_of(path: Path, needle: str) -> int:
    text = path.read_text(encoding="utf-8")
    return text[: text.index(needle)].count("\n") + 1


# -- the org loads with kinds of its own ----------------------------------------------------------------------
def test_the_invented_city_shares_no_kind_with_the_demo_but_the_fallback() -> None:
    assert ORG.kinds & DEMO_ORG.kinds == {"command_center"}
    assert {"sanitation", "landscaping", "water_conservancy", "disabled_persons_federation"} <= ORG.kinds
    assert ORG.kind_name("sanitation") == "环卫" and ORG.kind_name("unknown_kind") == "unknown_kind"
    assert RULES.fallback == "command_center"
    # a township whose grids sit directly under it: no community level in its branch
    assert [a.level for a in ORG.ancestors("liuzhuang-g1")] == [Level.grid, Level.street, Level.district, Level.city]


# -- routing: the walk up ---------------------------------------------------------------------------------------
def test_a_street_without_its_own_unit_is_served_by_the_districts() -> None:
    plan = plan_route(ORG, RULES, "liuzhuang-g1", "garbage_overflow", Level.street)
    assert (plan.level, plan.owner_area, plan.lead.department) == (Level.street, "liuzhuang", "dongcheng-sanitation")
    assert "lead sanitation -> dongcheng-sanitation (at dongcheng, serving liuzhuang)" in plan.rule
    # a street with its own unit keeps it: the nearest department serves, never a farther one
    own = plan_route(ORG, RULES, "binhe-g1", "garbage_overflow", Level.street)
    assert (own.owner_area, own.lead.department) == ("hexi", "hexi-sanitation")


def test_a_city_level_agency_serves_every_district() -> None:
    for grid, district in (("liuzhuang-g1", "dongcheng"), ("nanpo-g1", "xicheng")):
        plan = plan_route(ORG, RULES, grid, "flood_risk", start_level(RULES, "flood_risk"))
        assert (plan.owner_area, plan.lead.department) == (district, "qinghe-water")


def test_only_a_lead_kind_nothing_serves_goes_to_the_fallback() -> None:
    # 山阳街道 and 西城区 have no 残联: the street's command centre takes it (兜底), and the gap is in the plan
    plan = plan_route(ORG, RULES, "nanpo-g1", "accessibility", Level.street)
    assert plan.lead.department == "shanyang-hub" and plan.lead.kind == "command_center"
    assert [(u.kind, u.area, u.role) for u in plan.unserved] == [
        ("disabled_persons_federation", "shanyang", "lead"), ("social_affairs", "shanyang", "co")]
    # under 东城区 the district's 残联 serves 柳庄镇 and the township's own 社会事务办 co-handles
    east = plan_route(ORG, RULES, "liuzhuang-g2", "accessibility", Level.street)
    assert [(t.department, t.role) for t in east.tasks] == [("dongcheng-cdpf", "lead"), ("liuzhuang-social", "co")]
    assert east.unserved == ()


def test_a_community_category_in_the_township_is_owned_by_the_township() -> None:
    plan = plan_route(ORG, RULES, "liuzhuang-g1", "fallen_tree", start_level(RULES, "fallen_tree"))
    assert (plan.level, plan.owner_area) == (Level.street, "liuzhuang")
    assert [(t.department, t.role) for t in plan.tasks] == [("liuzhuang-hub", "lead"), ("dongcheng-sanitation", "co")]
    up = plan_escalation(ORG, RULES, "liuzhuang-g1", "fallen_tree", plan.level)
    assert up is not None and (up.level, up.owner_area, up.lead.department) == (Level.district, "dongcheng",
                                                                                "dongcheng-hub")


def test_a_co_kind_nothing_serves_is_recorded_in_the_routed_event_not_dropped() -> None:
    rules = RouterRules(org=ORG, rulebook=RULES, clocks=SlaClocks(WorkCalendar("natural")))
    reported = decide(fold("i1", []), cmd.ReportIssue(grid="liuzhuang-g1", category="garbage_overflow", title="t",
                                                      reporter="gw", risk=("blocked_road",)), T0)
    state = fold("i1", [(e, 1) for e in reported])
    out = react(state, reported[0], 1, rules, T0)
    routed = out[0]
    assert isinstance(routed, ev.IssueRouted)
    assert routed.unserved == (ev.UnservedKind(kind="landscaping", area="liuzhuang", role="co"),)
    assert "unserved co landscaping (none at liuzhuang or above)" in routed.rule
    assert [e.department for e in out if isinstance(e, ev.TaskDispatched)] == ["dongcheng-sanitation"]
    # the urgency in force (the risk flag's urgent) is on the event, and the issue shows it once folded
    assert routed.urgency == "urgent" and state.urgency == "normal"
    after = fold("i1", [(e, n) for n, e in enumerate([*reported, *out], 1)])
    assert after.urgency == "urgent" and after.unserved == routed.unserved
    # and the read model's row too, while the gap is counted per kind
    batch = Batch(org=ORG, tz=ZoneInfo("Asia/Shanghai"))
    for n, e in enumerate([*reported, *out], 1):
        apply(batch, Envelope(id=f"i1.{n}", source="t", subject="i1", time=T0, data=e, actor="t", seq=n))
    assert batch.issues["i1"]["urgency"] == "urgent"
    assert {k[1:]: v for k, v in batch.stats.items() if k[1] == "kind"} == {("kind", "landscaping", "unserved_co"): 1}


def test_routing_never_lowers_the_urgency_in_force() -> None:
    reported = ev.IssueReported(grid="g", category="c", title="t", urgency="emergency", reporter="gw", reported_at=T0)
    routed = ev.IssueRouted(level="street", owner_area="s", reason="reported", rule="r", rulebook_version="v",
                            urgency="urgent")
    assert fold("i", [(reported, 1), (routed, 2)]).urgency == "emergency"
    old = ev.IssueRouted(level="street", owner_area="s", reason="reported", rule="r", rulebook_version="v")
    assert fold("i", [(reported, 1), (old, 2)]).urgency == "emergency"  # events written before the field


# -- cross-checks -------------------------------------------------------------------------------------------------
def test_a_rulebook_kind_no_department_has_is_refused_with_file_line_and_suggestion(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text(RULES_FILE.read_text(encoding="utf-8").replace("co: [landscaping]", "co: [landscapping]"),
                   encoding="utf-8")
    rules = load_rulebook(bad)  # the rulebook alone is well-formed: kinds are open
    with pytest.raises(ConfigError) as info:
        check_against_org(rules, ORG)
    err = info.value
    assert (err.file, err.line, err.path) == (str(bad), line_of(bad, "landscapping"),
                                              "categories.garbage_overflow.handlers.street.co[0]")
    assert "unknown department kind 'landscapping'" in err.problem and "did you mean 'landscaping'?" in err.problem
    assert str(err).startswith(f"{bad}:{err.line}: categories.garbage_overflow.handlers.street.co[0]: ")


def test_every_error_is_reported_and_an_unknown_fallback_too() -> None:
    text = RULES_FILE.read_text(encoding="utf-8")
    rules = parse_rulebook(text.replace("fallback: command_center", "fallback: command_centre")
                           .replace("lead: water_conservancy", "lead: water"), "r.yaml")
    report = cross_check(rules, ORG)
    assert [(f.path, f.line) for f in report.errors] == [
        ("fallback", line_of(RULES_FILE, "fallback:")),
        ("categories.flood_risk.handlers.district.lead", line_of(RULES_FILE, "lead: water_conservancy"))]
    assert "did you mean 'command_center'" in report.errors[0].problem and not report.ok
    with pytest.raises(ConfigError, match=r"and 1 more"):
        check_against_org(rules, ORG)


def test_a_kind_some_owner_areas_cannot_reach_is_a_warning_listing_them() -> None:
    warnings = check_against_org(RULES, ORG)  # no error: it loads
    by_path = {w.path: w for w in warnings}
    landscaping = by_path["categories.garbage_overflow.handlers.street.co[0]"]
    assert landscaping.severity == "warning" and landscaping.line == line_of(RULES_FILE, "co: [landscaping]")
    assert "serves 1 of 3 street areas; none at or above liuzhuang, hexi" in landscaping.problem
    assert "categories.flood_risk.handlers.district.lead" not in by_path  # the city's agency reaches everyone


def test_the_coverage_table_counts_owner_areas_per_category_and_level() -> None:
    rows = {(r.category, r.level): r for r in cross_check(RULES, ORG).coverage}
    street = rows[("garbage_overflow", Level.street)]
    assert street.areas == 3 and street.handled
    assert [(k.kind, k.role, k.served, k.unserved) for k in street.kinds] == [
        ("sanitation", "lead", 2, ("shanyang",)), ("landscaping", "co", 1, ("liuzhuang", "hexi"))]
    assert street.fallback_areas == ("shanyang",)
    flood = rows[("flood_risk", Level.district)]
    assert [(k.kind, k.served, k.unserved) for k in flood.kinds] == [("water_conservancy", 2, ()),
                                                                     ("sanitation", 1, ("xicheng",))]
    community = rows[("fallen_tree", Level.community)]  # only two communities: 柳庄镇 has none
    assert community.areas == 2 and community.kinds[0].served == 2
    text = render_report(cross_check(RULES, ORG))
    assert "garbage_overflow  street     3      sanitation 2/3" in text
    assert text.rstrip().endswith("0 error(s), 8 warning(s)")


def test_a_level_without_handler_is_all_fallback_in_the_table() -> None:
    org = parse_org("""\
areas:
  - {id: c, name: C, level: city}
  - {id: s, name: S, level: street, parent: c}
  - {id: g, name: G, level: grid, parent: s}
departments:
  - {id: c-hub, name: Hub, kind: command_center, area: c}
""", "o.yaml")
    rules = parse_rulebook("categories:\n  x:\n    name: X\n    start: street\n    sla: {acknowledge: PT1H, "
                           "resolve: P1D}\n", "r.yaml")
    (row,) = cross_check(rules, org).coverage
    assert (row.level, row.areas, row.handled, row.fallback_areas) == (Level.street, 1, False, ("*",))


def test_configuration_gaps_are_those_under_the_area() -> None:
    gaps = configuration_gaps(RULES, ORG, "xicheng")
    assert [(g["category"], g["level"], g["kind"], g["role"]) for g in gaps] == [
        ("garbage_overflow", "street", "sanitation", "lead"), ("garbage_overflow", "district", "sanitation", "lead"),
        ("flood_risk", "district", "sanitation", "co"), ("accessibility", "street", "disabled_persons_federation",
                                                          "lead"),
        ("accessibility", "street", "social_affairs", "co"), ("fallen_tree", "street", "sanitation", "co")]
    assert all(set(g["areas"]) <= {"xicheng", "shanyang"} for g in gaps)
    assert next(g for g in gaps if g["kind"] == "disabled_persons_federation")["kind_name"] == "残联"


# -- the command line ---------------------------------------------------------------------------------------------
def test_rules_check_with_org_prints_the_coverage_table_and_fails_on_errors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from services.entrypoints import cli

    ok = CliRunner().invoke(cli.app, ["rules", "check", str(RULES_FILE), "--org", str(ORG_FILE)])
    assert ok.exit_code == 0, ok.output
    assert "garbage_overflow  street     3      sanitation 2/3" in ok.output and "warning: " in ok.output
    assert ok.output.rstrip().endswith("ok: rulebook anycity-rules-1, 4 categories")
    bad = tmp_path / "rules.yaml"
    bad.write_text(RULES_FILE.read_text(encoding="utf-8").replace("lead: sanitation", "lead: sanitaton"),
                   encoding="utf-8")
    failed = CliRunner().invoke(cli.app, ["rules", "check", str(bad), "--org", str(ORG_FILE)])
    assert failed.exit_code == 1
    assert f"error: {bad}:{line_of(bad, 'lead: sanitaton')}: categories.garbage_overflow.handlers.street.lead: " \
           "unknown department kind 'sanitaton'" in failed.output and "did you mean 'sanitation'?" in failed.output
    # without --org the file alone is checked: kinds are open, so it is well-formed
    assert CliRunner().invoke(cli.app, ["rules", "check", str(bad)]).exit_code == 0


def test_the_stack_refuses_a_rulebook_naming_a_kind_the_org_lacks(tmp_path: Path) -> None:
    """What ``needle up`` (and every service process) loads first: an error refuses to start."""
    from services.entrypoints.stack import Stack, Urls
    from shared.settings import Settings

    bad = tmp_path / "rules.yaml"
    bad.write_text(RULES_FILE.read_text(encoding="utf-8").replace("lead: residents_committee", "lead: committee"),
                   encoding="utf-8")
    urls = Urls(nats="", database=None)
    with pytest.raises(ConfigError, match=r"fallen_tree\.handlers\.community\.lead: unknown department kind 'comm"):
        Stack.from_settings(Settings(data_dir=tmp_path, org=ORG_FILE, rules=bad), urls)
    stack = Stack.from_settings(Settings(data_dir=tmp_path, org=ORG_FILE, rules=RULES_FILE), urls)
    assert stack.org.kinds == ORG.kinds
