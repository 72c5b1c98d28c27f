"""Routing: which level owns an issue and which departments get its tasks. Pure: no IO, no clock.

The rules (DESIGN.md, "Contract: org tree and rulebook"):

* The start level is the category's ``start``, lifted (never lowered) by the highest known risk flag and by the
  rulebook's optional ``urgency.<u>.min_start``. Unknown risk flags are ignored.
* The owner area is the grid's ancestor at that level; when the grid's branch has no area at that level, the
  next level up that it has (and the root when the level is above the whole branch).
* A department serves its area and everything under it. A kind is resolved for the owner area by walking up
  from it: the department of that kind attached to the owner area, else to its parent, ... up to the root;
  the first one found serves (a city-level bureau serves every district; a district's unit serves a street
  without its own). Nothing below the owner area is ever chosen.
* With a handler entry for the owner's level, the lead is the department serving the owner area with the lead
  kind, and each co kind gives the department serving the owner area with that kind. When no department of the
  lead kind serves the owner area, or the level has no handler entry, the fallback kind (the rulebook's
  ``fallback``, default ``command_center``: 兜底) serving the owner area leads — the owner area's own, else the
  nearest ancestor's. The lead never appears again as a co-handler.
* Nothing is dropped silently: a lead or co kind that nothing serves is kept in the plan's ``unserved``
  (kind, owner area, role), which the router records in the ``issue_routed`` event and counts in a metric.
* Escalation goes to the owner area's parent (levels the branch lacks are skipped) and stops at the root
  (never past the city).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from shared.config.org import Area, Department, OrgTree
from shared.config.rulebook import DEFAULT_FALLBACK, URGENCIES, Rulebook
from shared.domain.errors import Invalid
from shared.domain.levels import Level
from shared.domain.rules import check_category, check_grid, escalation_level

FALLBACK_KIND = DEFAULT_FALLBACK
"""The default kind that takes what nobody else owns (兜底); a rulebook may name another (``fallback:``)."""


class NoCommandCenter(LookupError):
    """The org has no department of the fallback kind (``command_center`` unless the rulebook names another) at
    or above an area, so nobody can take an unowned issue.

    A configuration gap, not a bad request: give the root area one (``needle rules check --org`` warns)."""


@dataclass(frozen=True)
class TaskPlan:
    department: str
    role: Literal["lead", "co"]
    kind: str


@dataclass(frozen=True)
class Unserved:
    """A kind the rulebook asks for that no department serves at the owner area or above."""

    kind: str
    area: str
    role: Literal["lead", "co"]


@dataclass(frozen=True)
class RoutePlan:
    level: Level
    owner_area: str
    tasks: tuple[TaskPlan, ...]
    rule: str
    """Human-readable why, e.g. ``rulebook 1a2b3c4d5e6f categories.sea_safety.handlers.district: lead
    ocean_fisheries -> putuo-ocean; co maritime_police -> putuo-maritime``."""
    rulebook_version: str
    unserved: tuple[Unserved, ...] = ()
    """Kinds the rule names that nothing serves at the owner area (a lead here means 兜底 took it)."""

    @property
    def lead(self) -> TaskPlan:
        return next(t for t in self.tasks if t.role == "lead")

    @property
    def co(self) -> tuple[TaskPlan, ...]:
        return tuple(t for t in self.tasks if t.role == "co")


# -- input checks ---------------------------------------------------------------------------------------------
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
    levels = [check_category(rulebook, category).start]
    levels += [rulebook.risk[f].level for f in flags if f in rulebook.risk]
    rule = rulebook.urgency.get(effective_urgency(rulebook, urgency, flags))
    if rule is not None and rule.min_start is not None:
        levels.append(rule.min_start)
    return max(levels, key=lambda lv: lv.rank)


# -- routing --------------------------------------------------------------------------------------------------
def _fallback(org: OrgTree, owner: Area, kind: str = FALLBACK_KIND) -> Department:
    dept = org.serving(owner.id, kind)
    if dept is None:
        raise NoCommandCenter(f"no {kind} at or above area {owner.id!r}")
    return dept


def _served(org: OrgTree, owner: Area, kind: str) -> tuple[Department | None, str]:
    """The department of ``kind`` serving ``owner`` and how it was found, for the plan's ``rule``."""
    dept = org.serving(owner.id, kind)
    if dept is None:
        return None, f"none at {owner.id} or above"
    return dept, ("" if dept.area == owner.id else f"at {dept.area}, serving {owner.id}")


def plan_route(org: OrgTree, rulebook: Rulebook, grid_id: str, category: str, level: Level) -> RoutePlan:
    """Who handles ``category`` reported at ``grid_id`` when ``level`` owns it.

    Raises :class:`Invalid` (``field`` "category" or "grid") for an unknown category or grid."""
    cat = check_category(rulebook, category)
    check_grid(org, grid_id)
    owner = org.owner_at(grid_id, level)
    fallback = rulebook.fallback
    notes: list[str] = []
    if owner.level != level:
        notes.append(f"no {level} above {grid_id}, owner {owner.id} is a {owner.level}")
    handler = cat.handlers.get(owner.level)
    tasks: list[TaskPlan] = []
    unserved: list[Unserved] = []
    if handler is None:
        where = f"rulebook {rulebook.version} categories.{cat.id}"
        lead = _fallback(org, owner, fallback)
        notes.insert(0, f"no handler for {owner.level}, {fallback} -> {lead.id} (兜底)")
        tasks.append(TaskPlan(lead.id, "lead", lead.kind))
    else:
        where = f"rulebook {rulebook.version} categories.{cat.id}.handlers.{owner.level}"
        found, how = _served(org, owner, handler.lead)
        if found is not None:
            lead = found
            parts = [f"lead {handler.lead} -> {lead.id}" + (f" ({how})" if how else "")]
        else:
            lead = _fallback(org, owner, fallback)
            unserved.append(Unserved(handler.lead, owner.id, "lead"))
            parts = [f"lead {handler.lead} ({how}), {fallback} -> {lead.id} (兜底)"]
        tasks.append(TaskPlan(lead.id, "lead", lead.kind))
        co_parts: list[str] = []
        missing: list[str] = []
        for kind in handler.co:
            dept, how = _served(org, owner, kind)
            if dept is None:
                missing.append(kind)
                unserved.append(Unserved(kind, owner.id, "co"))
            elif all(t.department != dept.id for t in tasks):
                tasks.append(TaskPlan(dept.id, "co", kind))
                co_parts.append(f"{kind} -> {dept.id}" + (f" ({how})" if how else ""))
        if co_parts:
            parts.append("co " + ", ".join(co_parts))
        if missing:
            parts.append(f"unserved co {', '.join(missing)} (none at {owner.id} or above)")
        notes = parts + notes
    return RoutePlan(
        level=owner.level,
        owner_area=owner.id,
        tasks=tuple(tasks),
        rule=f"{where}: " + "; ".join(notes),
        rulebook_version=rulebook.version,
        unserved=tuple(unserved),
    )


def plan_escalation(
    org: OrgTree, rulebook: Rulebook, grid_id: str, category: str, current_level: Level
) -> RoutePlan | None:
    """The plan one level above the current owner (levels the branch lacks are skipped); None at the top."""
    check_category(rulebook, category)
    check_grid(org, grid_id)
    up = escalation_level(org, grid_id, current_level)
    return None if up is None else plan_route(org, rulebook, grid_id, category, up)


def plan_campaign(
    org: OrgTree, area_id: str, prefer: Sequence[str], fallback: str = FALLBACK_KIND
) -> list[tuple[str, str]]:
    """A top-down campaign (e.g. 婴幼儿排查) fans out one task per grid under ``area_id``.

    Returns ``[(grid_id, department_id), ...]`` in tree order. For each grid, the nearest unit (the grid first,
    then its community, ...) of a ``prefer`` kind takes the task, kinds tried in order at each area; with none,
    the nearest ``fallback``. Raises :class:`Invalid` (field "area") for an unknown area."""
    if area_id not in org.areas:
        raise Invalid(f"unknown area {area_id!r}", field="area")
    out: list[tuple[str, str]] = []
    for grid in org.grids_under(area_id):
        chosen: Department | None = None
        for area in org.ancestors(grid.id):
            chosen = next((d for k in prefer if (d := org.department_of_kind(area.id, k)) is not None), None)
            if chosen is not None:
                break
        out.append((grid.id, (chosen or _fallback(org, grid, fallback)).id))
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
    center = org.serving(owner_area, rulebook.fallback)
    if center is not None and center.id not in out:
        return center.id
    return None
