"""Routing (services/router/routing.py): start level, owner area, lead and co-handlers, escalation, campaigns.
Pure functions over the org tree and the rulebook; no server."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.router.routing import (
    RoutePlan,
    effective_urgency,
    plan_campaign,
    plan_escalation,
    plan_route,
    start_level,
)
from shared.config import OrgTree, Rulebook, load_org, load_rulebook, parse_org, parse_rulebook
from shared.domain.errors import Invalid
from shared.domain.levels import LEVEL_ORDER, Level

ROOT = Path(__file__).resolve().parents[2]
CONTRACT_ORG = load_org(ROOT / "tests/fixtures/contract_org.yaml")
CONTRACT_RULES = load_rulebook(ROOT / "tests/fixtures/contract_rules.yaml")
DEMO_ORG = load_org(ROOT / "deploy/org/zhoushan.yaml")
DEMO_RULES = load_rulebook(ROOT / "deploy/rules/zhoushan.yaml")


def departments(plan: RoutePlan, role: str) -> set[str]:
    return {t.department for t in plan.tasks if t.role == role}


# -- the contract fixture -------------------------------------------------------------------------------------
def test_road_damage_goes_to_district_transport_with_police() -> None:
    # given a road damage report in grid wuxing-g1 (contract fixture)
    level = start_level(CONTRACT_RULES, "road_damage", "urgent", [])
    # when it is routed at its start level
    plan = plan_route(CONTRACT_ORG, CONTRACT_RULES, "wuxing-g1", "road_damage", level)
    # then the district transport bureau leads and the police co-handle
    assert (plan.level, plan.owner_area) == (Level.district, "dinghai")
    assert departments(plan, "lead") == {"dinghai-roads"} and departments(plan, "co") == {"dinghai-police"}
    assert plan.lead.kind == "transport" and plan.rulebook_version == CONTRACT_RULES.version
    assert plan.rule.startswith(f"rulebook {CONTRACT_RULES.version} categories.road_damage.handlers.district: "
                                "lead transport -> dinghai-roads")


def test_a_level_without_handler_entry_goes_to_that_areas_command_center() -> None:
    # given neighbour disputes have handlers only at the community level
    # when one is owned by the street
    plan = plan_route(CONTRACT_ORG, CONTRACT_RULES, "wuxing-g2", "neighbour_dispute", Level.street)
    # then the street command centre takes it alone (兜底)
    assert plan.owner_area == "huannan" and plan.tasks == (plan.lead,)
    assert plan.lead.department == "huannan-center" and plan.lead.kind == "command_center"
    assert "兜底" in plan.rule and "no handler for street" in plan.rule


def test_escalation_climbs_to_the_city_then_stops() -> None:
    # given a neighbour dispute owned by the community
    plan: RoutePlan | None = plan_route(CONTRACT_ORG, CONTRACT_RULES, "wuxing-g1", "neighbour_dispute",
                                        Level.community)
    owners = []
    # when it escalates again and again
    while plan is not None:
        owners.append((plan.level, plan.owner_area, plan.lead.department))
        plan = plan_escalation(CONTRACT_ORG, CONTRACT_RULES, "wuxing-g1", "neighbour_dispute", plan.level)
    # then each level up takes it once, and nothing goes past the city
    assert owners == [
        (Level.community, "wuxing", "wuxing-committee"),
        (Level.street, "huannan", "huannan-center"),
        (Level.district, "dinghai", "dinghai-center"),
        (Level.city, "city", "city-center"),
    ]


@pytest.mark.parametrize(("call", "field"), [
    (lambda: plan_route(CONTRACT_ORG, CONTRACT_RULES, "wuxing-g1", "nope", Level.district), "category"),
    (lambda: plan_route(CONTRACT_ORG, CONTRACT_RULES, "nowhere", "road_damage", Level.district), "grid"),
    (lambda: plan_route(CONTRACT_ORG, CONTRACT_RULES, "wuxing", "road_damage", Level.district), "grid"),
    (lambda: plan_escalation(CONTRACT_ORG, CONTRACT_RULES, "wuxing-g1", "nope", Level.city), "category"),
    (lambda: plan_escalation(CONTRACT_ORG, CONTRACT_RULES, "nowhere", "road_damage", Level.city), "grid"),
    (lambda: start_level(CONTRACT_RULES, "nope"), "category"),
    (lambda: start_level(CONTRACT_RULES, "road_damage", "very_urgent"), "urgency"),
    (lambda: plan_campaign(CONTRACT_ORG, "nowhere", ["community_committee"]), "area"),
], ids=["route category", "route grid", "route non-grid", "escalate category", "escalate grid", "start category",
        "urgency", "campaign area"])
def test_unknown_inputs_are_invalid_with_the_field_named(call: object, field: str) -> None:
    with pytest.raises(Invalid) as info:
        call()  # type: ignore[operator]
    assert info.value.field == field and info.value.status == 422


# -- the four stories on the demo -----------------------------------------------------------------------------
def test_collective_petition_lifts_slope_works_complaint_to_the_street() -> None:
    # given a construction nuisance at grid 33 of 展茅 with a collective-petition risk flag
    level = start_level(DEMO_RULES, "construction_nuisance", "normal", ["collective_petition"])
    # when it is routed
    plan = plan_route(DEMO_ORG, DEMO_RULES, "zhanmao-g33", "construction_nuisance", level)
    # then the street owns it: its command centre leads and several departments co-handle at once
    assert level == Level.street and effective_urgency(DEMO_RULES, "normal", ["collective_petition"]) == "urgent"
    assert (plan.level, plan.owner_area, plan.lead.department) == (Level.street, "zhanmao", "zhanmao-center")
    assert {"zhanmao-enforcement", "zhanmao-ecology", "zhanmao-housing"} == departments(plan, "co")


def test_sea_safety_at_mayidao_goes_straight_to_the_district_ocean_bureau() -> None:
    level = start_level(DEMO_RULES, "sea_safety", "urgent")
    plan = plan_route(DEMO_ORG, DEMO_RULES, "mayidao-g1", "sea_safety", level)
    assert (plan.level, plan.lead.department) == (Level.district, "putuo-ocean")
    assert departments(plan, "co") == {"putuo-coastguard"}


def test_huludao_care_home_escalates_level_by_level_to_district_civil_affairs() -> None:
    plan = plan_route(DEMO_ORG, DEMO_RULES, "huludao-g1", "elderly_care", Level.community)
    street = plan_escalation(DEMO_ORG, DEMO_RULES, "huludao-g1", "elderly_care", plan.level)
    assert street is not None and street.owner_area == "xiazhi" and street.lead.department == "xiazhi-center"
    assert "unserved co social_organisation" in street.rule  # 虾峙 has no social organisation centre
    assert [(u.kind, u.area, u.role) for u in street.unserved] == [("social_organisation", "xiazhi", "co")]
    district = plan_escalation(DEMO_ORG, DEMO_RULES, "huludao-g1", "elderly_care", street.level)
    assert district is not None and district.lead.department == "putuo-civil"
    assert departments(district, "co") == {"putuo-health", "putuo-housing", "putuo-resources"}


PREFER = ("grid_team", "community_committee")  # the demo's kinds: the city's vocabulary is the caller's


def test_infant_census_campaign_fans_out_one_task_per_grid() -> None:
    tasks = plan_campaign(DEMO_ORG, "zhanmao", PREFER)
    assert [g for g, _ in tasks] == [a.id for a in DEMO_ORG.grids_under("zhanmao")]
    by_grid = dict(tasks)
    assert by_grid["zhanmao-g33"] == "zhanmao-g33-team"  # a grid team takes it where there is one
    assert by_grid["zhanmao-g31"] == "dazhan-committee"  # else the community committee
    assert plan_campaign(DEMO_ORG, "zhanmao-g33", PREFER) == [("zhanmao-g33", "zhanmao-g33-team")]


# -- fallbacks, lifting and skipped levels --------------------------------------------------------------------
def test_a_lead_kind_missing_at_the_street_is_served_by_the_district() -> None:
    # 桃花镇 has no 司法所, which leads neighbour disputes at the street level: 普陀区司法局 serves it
    plan = plan_route(DEMO_ORG, DEMO_RULES, "taohua-g1", "neighbour_dispute", Level.street)
    assert plan.lead.department == "putuo-justice" and "lead justice -> putuo-justice (at putuo, serving taohua)" \
        in plan.rule
    assert departments(plan, "co") == {"taohua-police"}
    assert [(u.kind, u.role) for u in plan.unserved] == [("social_worker_station", "co")]  # recorded, not dropped


def test_construction_nuisance_at_shenjiamen_keeps_the_districts_ecology_bureau() -> None:
    # 沈家门 has no ecology or housing office of its own: 普陀区's serve it (it used to lose 生态环境 silently)
    grid = DEMO_ORG.grids_under("shenjiamen")[0].id
    plan = plan_route(DEMO_ORG, DEMO_RULES, grid, "construction_nuisance", Level.street)
    assert plan.lead.department == "shenjiamen-center"
    assert departments(plan, "co") == {"shenjiamen-enforcement", "putuo-ecology", "putuo-housing"}
    assert plan.unserved == () and "ecology_environment -> putuo-ecology (at putuo, serving shenjiamen)" in plan.rule


def test_an_area_without_command_center_falls_back_to_the_nearest_ancestors() -> None:
    plan = plan_route(DEMO_ORG, DEMO_RULES, "zhanmao-g33", "sea_safety", Level.community)
    assert plan.owner_area == "dazhan" and plan.lead.department == "zhanmao-center"


def test_risk_lifts_but_never_lowers_and_unknown_flags_are_ignored() -> None:
    assert start_level(DEMO_RULES, "sea_safety", "normal", ["collective_petition"]) == Level.district
    assert start_level(DEMO_RULES, "noise", "normal", ["no_such_flag"]) == Level.community
    assert start_level(DEMO_RULES, "noise", "normal", ["collective_petition", "violence"]) == Level.district
    assert start_level(DEMO_RULES, "noise", "normal", ["mass_casualty"]) == Level.city
    assert effective_urgency(DEMO_RULES, "urgent", ["violence"]) == "emergency"
    assert effective_urgency(DEMO_RULES, "emergency", ["collective_petition"]) == "emergency"
    assert effective_urgency(DEMO_RULES, "normal", ["no_such_flag"]) == "normal"


def small_rules(lead: str, co: str = "") -> Rulebook:
    """One category 'leak', started at the community, with a street handler and an emergency rule."""
    return parse_rulebook(f"""\
categories:
  leak:
    name: 漏水
    start: community
    sla: {{acknowledge: PT1H, resolve: P1D}}
    handlers:
      street: {{lead: {lead}, co: [{co}]}}
urgency:
  emergency: {{min_start: street, sla_factor: 0.5}}
""", "r.yaml")


def test_urgency_config_lifts_the_start_level() -> None:
    rules = small_rules("command_center")
    assert start_level(rules, "leak", "urgent") == Level.community
    assert start_level(rules, "leak", "emergency") == Level.street
    assert start_level(rules, "leak", "normal", ["unknown_flag"]) == Level.community


def test_the_lead_never_appears_again_as_co_handler() -> None:
    rules = small_rules("water_utility", "command_center, urban_management")
    org = parse_org("""\
areas:
  - {id: s, name: S, level: street}
  - {id: g, name: G, level: grid, parent: s}
departments:
  - {id: s-center, name: C, kind: command_center, area: s}
""", "o.yaml")
    # water_utility is missing, so the command centre leads; it must not also be a co-handler
    plan = plan_route(org, rules, "g", "leak", Level.street)
    assert plan.lead.department == "s-center" and plan.co == ()
    assert "lead water_utility (none at s or above)" in plan.rule and "unserved co urban_management" in plan.rule


def test_levels_missing_from_the_branch_are_skipped() -> None:
    # given a small island township whose grids sit directly under the street (no community)
    org = parse_org("""\
areas:
  - {id: c, name: 市, level: city}
  - {id: d, name: 区, level: district, parent: c}
  - {id: island, name: 岛, level: street, parent: d}
  - {id: island-g1, name: 第1网格, level: grid, parent: island}
departments:
  - {id: c-center, name: 市中心, kind: command_center, area: c}
  - {id: island-center, name: 岛中心, kind: command_center, area: island}
""", "o.yaml")
    # when a community-level category is routed there, the street owns it
    plan = plan_route(org, CONTRACT_RULES, "island-g1", "neighbour_dispute", Level.community)
    assert (plan.level, plan.owner_area, plan.lead.department) == (Level.street, "island", "island-center")
    assert "no community above island-g1" in plan.rule
    # and escalation from the district goes to the city (the district has no command centre: the city's leads)
    up = plan_escalation(org, CONTRACT_RULES, "island-g1", "neighbour_dispute", Level.street)
    assert up is not None and (up.level, up.owner_area, up.lead.department) == (Level.district, "d", "c-center")
    assert plan_escalation(org, CONTRACT_RULES, "island-g1", "neighbour_dispute", Level.city) is None


# -- properties on the demo -----------------------------------------------------------------------------------
GRIDS = sorted(a.id for a in DEMO_ORG.areas.values() if a.level == Level.grid)
CATEGORIES = sorted(DEMO_RULES.categories)


def check_plan(org: OrgTree, rules: Rulebook, grid: str, plan: RoutePlan) -> None:
    leads = [t for t in plan.tasks if t.role == "lead"]
    assert len(leads) == 1
    assert leads[0].department not in {t.department for t in plan.co}
    assert len({t.department for t in plan.tasks}) == len(plan.tasks)
    assert org.is_under(grid, plan.owner_area) and org.area(plan.owner_area).level == plan.level
    for task in plan.tasks:
        dept = org.department(task.department)
        assert dept.kind == task.kind and org.is_under(grid, dept.area)
    assert plan.rulebook_version == rules.version and plan.rule.startswith(f"rulebook {rules.version} ")


@settings(max_examples=300, deadline=None)
@given(grid=st.sampled_from(GRIDS), category=st.sampled_from(CATEGORIES), level=st.sampled_from(LEVEL_ORDER))
def test_every_route_has_one_lead_not_among_co_handlers_serving_the_grid(grid: str, category: str,
                                                                         level: Level) -> None:
    plan = plan_route(DEMO_ORG, DEMO_RULES, grid, category, level)
    check_plan(DEMO_ORG, DEMO_RULES, grid, plan)
    assert plan.level.rank >= level.rank or plan.owner_area == DEMO_ORG.root.id


@settings(max_examples=200, deadline=None)
@given(grid=st.sampled_from(GRIDS), category=st.sampled_from(CATEGORIES),
       urgency=st.sampled_from(["normal", "urgent", "emergency"]),
       flags=st.lists(st.sampled_from(["collective_petition", "violence", "mass_casualty", "unknown_flag"]),
                      max_size=3))
def test_escalation_from_the_start_strictly_climbs_and_ends_at_the_city(grid: str, category: str, urgency: str,
                                                                         flags: list[str]) -> None:
    level = start_level(DEMO_RULES, category, urgency, flags)
    assert level.rank >= DEMO_RULES.category(category).start.rank
    plan: RoutePlan | None = plan_route(DEMO_ORG, DEMO_RULES, grid, category, level)
    last = None
    while plan is not None:
        check_plan(DEMO_ORG, DEMO_RULES, grid, plan)
        assert last is None or plan.level.rank > last.rank
        last = plan.level
        plan = plan_escalation(DEMO_ORG, DEMO_RULES, grid, category, plan.level)
    assert last == Level.city
