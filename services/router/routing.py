"""Routing: which level owns an issue and which departments get its tasks. Pure: no IO, no clock.

The rules (DESIGN.md, "Contract: org tree and rulebook"):

* The start level is the category's ``start``, lifted (never lowered) by the highest known risk flag and by the
  rulebook's optional ``urgency.<u>.min_start``. Unknown risk flags are ignored.
* The owner area is the grid's ancestor at that level; when the grid's branch has no area at that level, the
  next level up that it has (and the root when the level is above the whole branch).
* With a handler entry for the owner's level, the lead is the department of the lead kind attached exactly to
  the owner area; co-handlers are the departments of the co kinds attached exactly to the owner area, and co
  kinds the area lacks are skipped (the plan's ``rule`` says which). When the lead kind is missing, or the level
  has no handler entry, the owner area's ``command_center`` leads (兜底) — or, if the owner area has none, the
  nearest ancestor's. The lead never appears again as a co-handler.
* Escalation goes to the owner area's parent (levels the branch lacks are skipped) and stops at the root
  (never past the city).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from shared.config.org import Area, Department, OrgTree
from shared.config.rulebook import URGENCIES, Category, Rulebook
from shared.domain.errors import Invalid
from shared.domain.levels import Level

FALLBACK_KIND = "command_center"
"""The kind that takes what nobody else owns (兜底)."""


class NoCommandCenter(LookupError):
    """The org has no command_center at or above an area, so nobody can take an unowned issue.

    A configuration gap, not a bad request: give the root area a command_center."""


@dataclass(frozen=True)
class TaskPlan:
    department: str
    role: Literal["lead", "co"]
    kind: str


@dataclass(frozen=True)
class RoutePlan:
    level: Level
    owner_area: str
    tasks: tuple[TaskPlan, ...]
    rule: str
    """Human-readable why, e.g. ``rulebook 1a2b3c4d5e6f categories.sea_safety.handlers.district: lead
    ocean_fisheries -> putuo-ocean; co maritime_police -> putuo-maritime``."""
    rulebook_version: str

    @property
    def lead(self) -> TaskPlan:
        return next(t for t in self.tasks if t.role == "lead")

    @property
    def co(self) -> tuple[TaskPlan, ...]:
        return tuple(t for t in self.tasks if t.role == "co")


# -- input checks ---------------------------------------------------------------------------------------------
def _category(rulebook: Rulebook, category: str) -> Category:
    try:
        return rulebook.categories[category]
    except KeyError:
        raise Invalid(f"unknown category {category!r}", field="category") from None


def _grid(org: OrgTree, grid_id: str) -> Area:
    area = org.areas.get(grid_id)
    if area is None:
        raise Invalid(f"unknown grid {grid_id!r}", field="grid")
    if area.level != Level.grid:
        raise Invalid(f"{grid_id!r} is a {area.level}, not a grid", field="grid")
    return area


def _urgency_rank(urgency: str) -> int:
    try:
        return URGENCIES.index(urgency)
    except ValueError:
        raise Invalid(f"unknown urgency {urgency!r} (known: {', '.join(URGENCIES)})", field="urgency") from None


# -- start level and urgency ----------------------------------------------------------------------------------
def effective_urgency(rulebook: Rulebook, urgency: str = "normal", risk_flags: Iterable[str] = ()) -> str:
    """The higher of ``urgency`` and the urgency of every known risk flag (normal < urgent < emergency)."""
    ranks = [_urgency_rank(urgency)]
    ranks += [URGENCIES.index(rulebook.risk[f].urgency) for f in risk_flags if f in rulebook.risk]
    return URGENCIES[max(ranks)]


def start_level(
    rulebook: Rulebook, category: str, urgency: str = "normal", risk_flags: Iterable[str] = ()
) -> Level:
    """The level that owns a new issue: the category's ``start`` lifted by known risk flags and by the
    rulebook's ``urgency.<effective urgency>.min_start``."""
    flags = tuple(risk_flags)
    levels = [_category(rulebook, category).start]
    levels += [rulebook.risk[f].level for f in flags if f in rulebook.risk]
    rule = rulebook.urgency.get(effective_urgency(rulebook, urgency, flags))
    if rule is not None and rule.min_start is not None:
        levels.append(rule.min_start)
    return max(levels, key=lambda lv: lv.rank)


# -- routing --------------------------------------------------------------------------------------------------
def _fallback(org: OrgTree, owner: Area) -> Department:
    for area in org.ancestors(owner.id):
        dept = org.department_of_kind(area.id, FALLBACK_KIND)
        if dept is not None:
            return dept
    raise NoCommandCenter(f"no {FALLBACK_KIND} at or above area {owner.id!r}")


def plan_route(org: OrgTree, rulebook: Rulebook, grid_id: str, category: str, level: Level) -> RoutePlan:
    """Who handles ``category`` reported at ``grid_id`` when ``level`` owns it.

    Raises :class:`Invalid` (``field`` "category" or "grid") for an unknown category or grid."""
    cat = _category(rulebook, category)
    _grid(org, grid_id)
    owner = org.owner_at(grid_id, level)
    notes: list[str] = []
    if owner.level != level:
        notes.append(f"no {level} above {grid_id}, owner {owner.id} is a {owner.level}")
    handler = cat.handlers.get(owner.level)
    tasks: list[TaskPlan] = []
    if handler is None:
        where = f"rulebook {rulebook.version} categories.{cat.id}"
        lead = _fallback(org, owner)
        notes.insert(0, f"no handler for {owner.level}, {FALLBACK_KIND} -> {lead.id} (兜底)")
        tasks.append(TaskPlan(lead.id, "lead", lead.kind))
    else:
        where = f"rulebook {rulebook.version} categories.{cat.id}.handlers.{owner.level}"
        found = org.department_of_kind(owner.id, handler.lead)
        if found is not None:
            lead = found
            parts = [f"lead {handler.lead} -> {lead.id}"]
        else:
            lead = _fallback(org, owner)
            parts = [f"lead {handler.lead} (none at {owner.id}), {FALLBACK_KIND} -> {lead.id} (兜底)"]
        tasks.append(TaskPlan(lead.id, "lead", lead.kind))
        co_parts: list[str] = []
        skipped: list[str] = []
        for kind in handler.co:
            dept = org.department_of_kind(owner.id, kind)
            if dept is None:
                skipped.append(kind)
            elif all(t.department != dept.id for t in tasks):
                tasks.append(TaskPlan(dept.id, "co", kind))
                co_parts.append(f"{kind} -> {dept.id}")
        if co_parts:
            parts.append("co " + ", ".join(co_parts))
        if skipped:
            parts.append(f"skipped co {', '.join(skipped)} (none at {owner.id})")
        notes = parts + notes
    return RoutePlan(
        level=owner.level,
        owner_area=owner.id,
        tasks=tuple(tasks),
        rule=f"{where}: " + "; ".join(notes),
        rulebook_version=rulebook.version,
    )


def plan_escalation(
    org: OrgTree, rulebook: Rulebook, grid_id: str, category: str, current_level: Level
) -> RoutePlan | None:
    """The plan one level above the current owner (levels the branch lacks are skipped); None at the top."""
    _category(rulebook, category)
    _grid(org, grid_id)
    owner = org.owner_at(grid_id, current_level)
    if owner.parent is None or owner.level == Level.city:
        return None
    return plan_route(org, rulebook, grid_id, category, org.area(owner.parent).level)


def plan_campaign(
    org: OrgTree, area_id: str, prefer: Sequence[str] = ("grid_team", "community_committee")
) -> list[tuple[str, str]]:
    """A top-down campaign (e.g. 婴幼儿排查) fans out one task per grid under ``area_id``.

    Returns ``[(grid_id, department_id), ...]`` in tree order. For each grid, the nearest unit (the grid first,
    then its community, ...) of a ``prefer`` kind takes the task, kinds tried in order at each area; with none,
    the nearest ``command_center``. Raises :class:`Invalid` (field "area") for an unknown area."""
    if area_id not in org.areas:
        raise Invalid(f"unknown area {area_id!r}", field="area")
    out: list[tuple[str, str]] = []
    for grid in org.grids_under(area_id):
        chosen: Department | None = None
        for area in org.ancestors(grid.id):
            chosen = next((d for k in prefer if (d := org.department_of_kind(area.id, k)) is not None), None)
            if chosen is not None:
                break
        out.append((grid.id, (chosen or _fallback(org, grid)).id))
    return out


# -- dispatch control (issue 19) ------------------------------------------------------------------------------
def serves(org: OrgTree, department_id: str, area_id: str) -> bool:
    """A department serves its own area and everything under it."""
    dept = org.departments.get(department_id)
    return dept is not None and org.is_under(area_id, dept.area)


def next_department(org: OrgTree, rulebook: Rulebook, grid_id: str, category: str, level: Level, owner_area: str,
                    exclude: Iterable[str]) -> str | None:
    """退单同意 without a named department: who the rules pick next at the same level, never one in ``exclude``
    (the returner, the departments already holding the issue): the level's lead kind serving the owner area,
    then the nearest command centre serving it; None when neither is left (the lead's return then escalates)."""
    out = set(exclude)
    plan = plan_route(org, rulebook, grid_id, category, level)
    if plan.lead.department not in out:
        return plan.lead.department
    center = org.serving(owner_area, FALLBACK_KIND)
    if center is not None and center.id not in out:
        return center.id
    return None
