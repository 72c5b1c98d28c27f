"""Rules that the intake (checking a command) and the router (deciding what follows) both need, written once.
Pure: the org tree and the rulebook in, a value or an :class:`Invalid` naming the field out."""
from __future__ import annotations

from collections.abc import Iterable

from shared.config.org import Area, OrgTree
from shared.config.rulebook import Category, Rulebook
from shared.domain.errors import Invalid
from shared.domain.levels import Level


def check_grid(org: OrgTree, grid_id: str, field: str = "grid") -> Area:
    """The grid ``grid_id``; 422 naming ``field`` when it is unknown or an area of another level."""
    area = org.areas.get(grid_id)
    if area is None:
        raise Invalid(f"unknown grid {grid_id!r}", field=field)
    if area.level != Level.grid:
        raise Invalid(f"{grid_id!r} is a {area.level}, not a grid", field=field)
    return area


def check_category(rulebook: Rulebook, category: str, field: str = "category") -> Category:
    try:
        return rulebook.categories[category]
    except KeyError:
        raise Invalid(f"unknown category {category!r}", field=field) from None


def check_risk_flags(rulebook: Rulebook, flags: Iterable[str], field: str = "risk") -> None:
    for i, flag in enumerate(flags):
        if flag not in rulebook.risk:
            raise Invalid(f"unknown risk flag {flag!r} (known: {', '.join(sorted(rulebook.risk))})",
                          field=f"{field}.{i}")


def escalation_level(org: OrgTree, grid_id: str, current: Level) -> Level | None:
    """Where an issue owned at ``current`` goes one step up (逐级): the level of its owner area's parent, so
    levels the grid's branch lacks are skipped; None at the top (never past the city)."""
    owner = org.owner_at(grid_id, current)
    if owner.parent is None or owner.level == Level.city:
        return None
    return org.area(owner.parent).level
