"""Loading the org tree and the rulebook: the demo and contract files load, and every kind of mistake is
reported as one ConfigError naming the file, the line, the path inside the document and the problem."""
from __future__ import annotations

import hashlib
from datetime import time, timedelta
from pathlib import Path

import pytest

from shared.config import (
    ConfigError,
    Rulebook,
    format_duration,
    load_org,
    load_rulebook,
    parse_duration,
    parse_org,
    parse_rulebook,
)
from shared.domain.levels import Level

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"

ORG = """\
areas:
  - {id: city, name: 舟山市, level: city}
  - {id: putuo, name: 普陀区, level: district, parent: city}
  - {id: zhanmao, name: 展茅街道, level: street, parent: putuo}
  - {id: dazhan, name: 大展社区, level: community, parent: zhanmao}
  - {id: zhanmao-g33, name: 第33网格, level: grid, parent: dazhan, location: {lat: 30.04, lon: 122.25}}
departments:
  - {id: city-center, name: 市社会治理中心, kind: command_center, area: city}
  - {id: putuo-ocean, name: 普陀区海洋与渔业局, kind: ocean_fisheries, area: putuo}
  - {id: zhanmao-center, name: 展茅街道基层治理指挥中心, kind: command_center, area: zhanmao}
"""

RULES = """\
calendar: cn_workdays
timezone: Asia/Shanghai
working_hours: ["08:30-12:00", "13:30-17:30"]
warn_at: 0.8
categories:
  sea_safety:
    name: 海上安全
    start: district
    sla: {acknowledge: PT15M, resolve: PT1H, clock: natural}
    handlers:
      district: {lead: ocean_fisheries, co: [maritime_police]}
  construction_nuisance:
    name: 施工扰民
    group: 城乡建设
    start: community
    sla: {acknowledge: PT4H, resolve: P2D, clock: working}
    handlers:
      community: {lead: community_committee}
      street: {lead: command_center, co: [urban_management, ecology_environment]}
risk:
  collective_petition: {level: street, urgency: urgent}
escalate:
  on: [acknowledge_breach, resolve_breach, return, verification_failed_twice]
"""


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the first occurrence of ``needle``."""
    return text[: text.index(needle)].count("\n") + 1


def org_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_org(text, "deploy/org/x.yaml")
    return info.value


def rules_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_rulebook(text, "deploy/rules/x.yaml")
    return info.value


# -- files that must load ---------------------------------------------------------------------------------------
def test_demo_org_loads_with_the_story_places() -> None:
    org = load_org(ROOT / "deploy/org/zhoushan.yaml")
    assert org.root.id == "zhoushan" and org.root.level == Level.city
    assert 60 <= len(org.areas) <= 120
    assert org.area("zhanmao-g33").name == "第33网格" and org.area("zhanmao-g33").parent == "dazhan"
    assert org.area("mayidao-g1").parent == "mayidao-shequ" and org.is_under("mayidao-g1", "mayidao")
    assert [a.id for a in org.ancestors("huludao-g1")][1:] == ["huludao", "xiazhi", "putuo", "zhoushan"]
    assert org.department_of_kind("putuo", "ocean_fisheries").id == "putuo-ocean"  # type: ignore[union-attr]
    assert org.department_of_kind("zhanmao", "command_center").id == "zhanmao-center"  # type: ignore[union-attr]
    for grid in org.grids_under("zhoushan"):
        assert grid.location is not None
        assert 29.6 <= grid.location.lat <= 30.3 and 121.9 <= grid.location.lon <= 122.5, grid.id


def test_demo_rulebook_loads_with_the_required_categories() -> None:
    rules = load_rulebook(ROOT / "deploy/rules/zhoushan.yaml")
    required = {"sea_safety", "construction_nuisance", "elderly_care", "infant_census", "road_damage",
                "exposed_garbage", "construction_waste", "water_supply", "power_outage", "gas_leak",
                "neighbour_dispute", "illegal_parking", "noise", "stray_animals", "fire_hazard", "pollution",
                "illegal_building", "public_health", "petition"}
    assert required <= set(rules.categories)
    assert all(c.group and c.description for c in rules.categories.values())
    sea = rules.category("sea_safety")
    assert (sea.start, sea.sla.acknowledge, sea.sla.resolve, sea.sla.clock) == (
        Level.district, timedelta(minutes=15), timedelta(hours=1), "natural")
    assert sea.handlers[Level.district].lead == "ocean_fisheries"
    assert rules.category("exposed_garbage").sla.resolve == timedelta(hours=4)
    assert rules.category("construction_waste").sla.clock == "working"
    assert rules.category("elderly_care").handlers[Level.district].co == (
        "health", "housing_construction", "natural_resources")
    assert rules.risk["mass_casualty"].level == Level.city
    assert len(rules.escalate_on) == 4 and rules.calendar == "cn_workdays" and rules.warn_at == 0.8
    assert rules.working_hours == ((time(8, 30), time(12, 0)), (time(13, 30), time(17, 30)))


def test_contract_check_files_load() -> None:
    org = load_org(FIXTURES / "contract_org.yaml")
    rules = load_rulebook(FIXTURES / "contract_rules.yaml")
    assert org.root.id == "city" and {"wuxing-g1", "wuxing-g2"} <= set(org.areas)
    assert rules.escalate_on == {"acknowledge_breach", "resolve_breach", "return"}


def test_version_is_the_file_digest_unless_the_file_names_one() -> None:
    given = parse_rulebook(RULES, "r.yaml")
    assert len(given.version) == 12 and given.version == parse_rulebook(RULES, "other.yaml").version
    assert parse_rulebook(RULES + "# changed\n", "r.yaml").version != given.version
    assert parse_rulebook("version: '2024.3'\n" + RULES, "r.yaml").version == "2024.3"
    path = FIXTURES / "contract_rules.yaml"
    assert load_rulebook(path).version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_defaults_and_urgency_extension() -> None:
    minimal = "categories:\n  x:\n    name: X\n    start: grid\n    sla: {acknowledge: PT1H, resolve: P1D}\n"
    rules = parse_rulebook(minimal + "urgency:\n  emergency: {min_start: street, sla_factor: 0.25}\n", "r.yaml")
    assert isinstance(rules, Rulebook) and rules.timezone == "Asia/Shanghai" and rules.calendar == "cn_workdays"
    assert rules.category("x").sla.clock == "natural" and rules.category("x").handlers == {}
    assert rules.urgency["emergency"].min_start == Level.street
    assert rules.sla_for("x", "emergency").resolve == timedelta(hours=6)
    assert rules.sla_for("x", "urgent").resolve == timedelta(days=1)


def test_message_format_names_file_line_path_and_problem() -> None:
    text = ORG.replace("kind: ocean_fisheries", "kind: Ocean-Fisheries")
    err = org_error(text)
    line = line_of(text, "kind: Ocean")
    assert (err.file, err.line, err.path) == ("deploy/org/x.yaml", line, "departments[1].kind")
    assert str(err).startswith(f"deploy/org/x.yaml:{line}: departments[1].kind: invalid department kind "
                               "'Ocean-Fisheries': use lower-case letters")


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_org(tmp_path / "nope.yaml")


# -- org mistakes ---------------------------------------------------------------------------------------------
ORG_CASES = [
    # (id, old, new, expected path, line marker (in the new text), problem fragment)
    ("invalid yaml", "level: grid, parent: dazhan,", "level: grid, parent: [dazhan,", "", "parent: [dazhan",
     "invalid YAML"),
    ("missing field", "{id: dazhan, name: 大展社区, level:", "{id: dazhan, level:", "areas[3].name", "id: dazhan,",
     "missing required field 'name'"),
    ("unknown key", "parent: putuo}", "parnet: putuo}", "areas[2].parnet", "parnet", "did you mean 'parent'"),
    ("unknown level", "level: street", "level: town", "areas[2].level", "level: town", "unknown area level 'town'"),
    ("malformed kind", "kind: ocean_fisheries", "kind: 2ocean", "departments[1].kind", "2ocean",
     "invalid department kind '2ocean'"),
    ("kinds name", "departments:", "kinds: {ocean_fisheries: ''}\ndepartments:", "kinds.ocean_fisheries",
     "kinds:", "expected a non-empty string"),
    ("kinds key", "departments:", "kinds: {Ocean: 海洋}\ndepartments:", "kinds.Ocean", "kinds:",
     "invalid department kind 'Ocean'"),
    ("level order", "level: community, parent: zhanmao", "level: street, parent: zhanmao", "areas[3].level",
     "id: dazhan", "a street cannot be under the street 'zhanmao'"),
    ("level inverted", "level: grid, parent: dazhan", "level: city, parent: dazhan", "areas[4].level",
     "id: zhanmao-g33", "strictly below its parent"),
    ("parent missing", "parent: zhanmao}", "parent: zhanmoa}", "areas[3].parent", "zhanmoa",
     "unknown parent area 'zhanmoa'; did you mean 'zhanmao'"),
    ("cycle", "level: district, parent: city", "level: district, parent: dazhan", "areas[1].parent",
     "parent: dazhan}", "cycle in the area tree: putuo -> dazhan -> zhanmao -> putuo"),
    ("duplicate id", "{id: putuo-ocean,", "{id: zhanmao,", "departments[1].id", "{id: zhanmao, name: 普陀",
     "duplicate id 'zhanmao' (already used at areas[2].id, line 4)"),
    ("department area", "kind: ocean_fisheries, area: putuo", "kind: ocean_fisheries, area: putou",
     "departments[1].area", "area: putou", "unknown area 'putou'"),
    ("latitude", "lat: 30.04", "lat: 130.04", "areas[4].location.lat", "lat: 130", "outside [-90, 90]"),
    ("second root", "level: district, parent: city}", "level: district}", "areas[1]", "id: putuo,",
     "only one area may have no parent"),
    ("empty kind", "kind: ocean_fisheries", "kind:", "departments[1].kind", "kind:,", "got nothing"),
    ("bad id", "{id: dazhan,", "{id: da zhan,", "areas[3].id", "da zhan", "invalid area id"),
    ("not a list", "departments:\n  - {id: city-center", "departments: {}\nx:\n  - {id: city-center", "x", "x:",
     "unknown key 'x'"),
]


@pytest.mark.parametrize(("old", "new", "path", "marker", "problem"), [c[1:] for c in ORG_CASES],
                         ids=[c[0] for c in ORG_CASES])
def test_org_mistakes_are_reported_where_they_are(old: str, new: str, path: str, marker: str, problem: str) -> None:
    assert old in ORG
    text = ORG.replace(old, new, 1)
    err = org_error(text)
    assert err.file == "deploy/org/x.yaml"
    assert err.path == path, str(err)
    assert err.line == line_of(text, marker), str(err)
    assert problem in err.problem, str(err)
    assert str(err).startswith(f"deploy/org/x.yaml:{err.line}: ")


def test_an_empty_org_file_is_reported() -> None:
    assert "empty" in org_error("# nothing\n").problem
    assert "at least one area" in org_error("areas: []\n").problem


# -- rulebook mistakes ----------------------------------------------------------------------------------------
RULE_CASES = [
    ("invalid yaml", "warn_at: 0.8", "warn_at: [0.8", "", "categories:", "invalid YAML"),
    ("months", "resolve: PT1H", "resolve: P1M", "categories.sea_safety.sla.resolve", "P1M",
     "months and years have no fixed length"),
    ("years", "resolve: P2D", "resolve: P1Y", "categories.construction_nuisance.sla.resolve", "P1Y",
     "months and years"),
    ("bad duration", "acknowledge: PT15M", "acknowledge: 15min", "categories.sea_safety.sla.acknowledge", "15min",
     "bad ISO 8601 duration '15min'"),
    ("number duration", "acknowledge: PT15M", "acknowledge: 15", "categories.sea_safety.sla.acknowledge",
     "acknowledge: 15,", "expected an ISO 8601 duration"),
    ("ack longer", "acknowledge: PT4H, resolve: P2D", "acknowledge: P3D, resolve: P2D",
     "categories.construction_nuisance.sla.acknowledge", "P3D", "longer than the resolve"),
    ("missing resolve", "acknowledge: PT15M, resolve: PT1H, clock", "acknowledge: PT15M, clock",
     "categories.sea_safety.sla.resolve", "acknowledge: PT15M", "missing required field 'resolve'"),
    ("unknown start", "start: district", "start: province", "categories.sea_safety.start", "province",
     "unknown start level 'province'"),
    ("handler level", "      district: {lead: ocean", "      distrct: {lead: ocean",
     "categories.sea_safety.handlers.distrct", "distrct", "unknown handler level 'distrct'"),
    ("lead kind", "lead: ocean_fisheries", "lead: Fisheries", "categories.sea_safety.handlers.district.lead",
     "lead: Fisheries", "invalid department kind 'Fisheries'"),
    ("co kind", "co: [maritime_police]", "co: [coast guard]", "categories.sea_safety.handlers.district.co[0]",
     "coast guard", "invalid department kind 'coast guard'"),
    ("fallback kind", "warn_at: 0.8", "warn_at: 0.8\nfallback: 兜底", "fallback", "fallback:",
     "invalid department kind '兜底'"),
    ("lead twice", "co: [maritime_police]", "co: [ocean_fisheries]", "categories.sea_safety.handlers.district.co[0]",
     "co: [ocean_fisheries]", "listed twice"),
    ("clock", "clock: working", "clock: office", "categories.construction_nuisance.sla.clock", "office",
     "unknown clock 'office' (known: natural, working)"),
    ("warn_at one", "warn_at: 0.8", "warn_at: 1", "warn_at", "warn_at", "strictly between 0 and 1"),
    ("warn_at zero", "warn_at: 0.8", "warn_at: 0", "warn_at", "warn_at", "strictly between 0 and 1"),
    ("warn_at text", "warn_at: 0.8", "warn_at: high", "warn_at", "warn_at", "expected a number"),
    ("hours format", '"08:30-12:00"', '"8:30-12:00"', "working_hours[0]", "working_hours", "HH:MM-HH:MM"),
    ("hours reversed", '"13:30-17:30"', '"17:30-13:30"', "working_hours[1]", "working_hours", "ends before it starts"),
    ("hours overlap", '"13:30-17:30"', '"11:30-17:30"', "working_hours[1]", "working_hours", "overlaps"),
    ("hours range", '"13:30-17:30"', '"13:30-25:00"', "working_hours[1]", "working_hours", "not a time of day"),
    ("timezone", "timezone: Asia/Shanghai", "timezone: Asia/Zhoushan", "timezone", "timezone",
     "unknown time zone 'Asia/Zhoushan'"),
    ("risk level", "{level: street, urgency: urgent}", "{level: township, urgency: urgent}",
     "risk.collective_petition.level", "township", "unknown risk level 'township'"),
    ("risk urgency", "urgency: urgent}", "urgency: high}", "risk.collective_petition.urgency", "urgency: high",
     "unknown urgency 'high'"),
    ("risk name", "urgency: urgent}", "urgency: urgent, name: 1}", "risk.collective_petition.name", "name: 1}",
     "expected a non-empty string"),
    ("escalate on", "return, verification", "returned, verification", "escalate.on[2]", "returned",
     "unknown escalation trigger 'returned'"),
    ("calendar", "calendar: cn_workdays", "calendar: chinese", "calendar", "calendar", "unknown calendar 'chinese'"),
    ("category key", "    group: 城乡建设", "    groop: 城乡建设", "categories.construction_nuisance.groop", "groop",
     "did you mean 'group'"),
    ("top key", "warn_at: 0.8", "warn_at: 0.8\nwarn: 0.9", "warn", "warn: 0.9", "unknown key 'warn'"),
    ("duplicate key", "    start: district\n", "    start: district\n    start: city\n", "categories.sea_safety.start",
     "start: city", "duplicate key 'start'"),
    ("urgency factor", "escalate:", "urgency:\n  emergency: {sla_factor: 2}\nescalate:", "urgency.emergency.sla_factor",
     "sla_factor", "in (0, 1]"),
    ("urgency name", "escalate:", "urgency:\n  critical: {sla_factor: 0.5}\nescalate:", "urgency.critical",
     "critical", "unknown urgency 'critical'"),
]


@pytest.mark.parametrize(("old", "new", "path", "marker", "problem"), [c[1:] for c in RULE_CASES],
                         ids=[c[0] for c in RULE_CASES])
def test_rulebook_mistakes_are_reported_where_they_are(old: str, new: str, path: str, marker: str,
                                                       problem: str) -> None:
    assert old in RULES
    text = RULES.replace(old, new, 1)
    err = rules_error(text)
    assert err.file == "deploy/rules/x.yaml"
    assert err.path == path, str(err)
    assert err.line == line_of(text, marker), str(err)
    assert problem in err.problem, str(err)


def test_a_rulebook_without_categories_is_reported() -> None:
    err = rules_error("calendar: natural\n")
    assert (err.path, err.line) == ("categories", 1) and "missing required field 'categories'" in err.problem


# -- durations ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("PT15M", timedelta(minutes=15)), ("PT1H", timedelta(hours=1)), ("P2D", timedelta(days=2)),
    ("P15D", timedelta(days=15)), ("P2W", timedelta(weeks=2)), ("P1DT12H", timedelta(days=1, hours=12)),
    ("PT1H30M15S", timedelta(hours=1, minutes=30, seconds=15)), ("PT0.5S", timedelta(milliseconds=500)),
    ("PT24H", timedelta(days=1)),
])
def test_durations_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["P", "PT", "P1DT", "1H", "PT1h", "P-1D", "PT1H1D", "P1.5D", ""])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_format_duration_round_trips() -> None:
    for text in ("PT15M", "P2D", "P1DT12H", "PT1H30M15S", "PT0S"):
        assert format_duration(parse_duration(text)) == text
