"""A token's scope checked against the org it will be used on: a typo (``area:atlantis``) is refused when the
token is issued, with the nearest ids that exist, instead of showing up as a 403 on first use."""
from __future__ import annotations

import difflib

from shared.auth import validate_scope
from shared.config import OrgTree
from shared.domain.levels import Level


def _did_you_mean(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def check_scope(org: OrgTree, role: str, scope: str) -> None:
    """Raise ValueError when ``scope`` names nothing of ``org`` or does not suit ``role``: a grid worker's area
    is a grid, a handler's department exists, a supervisor's area exists."""
    validate_scope(role, scope)
    kind, _, ident = scope.partition(":")
    if kind == "area":
        area = org.areas.get(ident)
        if area is None:
            raise ValueError(f"no area {ident!r} in the org{_did_you_mean(ident, sorted(org.areas))}")
        if role == "grid_worker" and area.level != Level.grid:
            grids = sorted(a.id for a in org.areas.values() if a.level == Level.grid)
            raise ValueError(f"a grid worker's scope is a grid; {ident!r} is a {area.level}"
                             f"{_did_you_mean(ident, grids)}")
    elif kind == "dept" and ident not in org.departments:
        raise ValueError(f"no department {ident!r} in the org{_did_you_mean(ident, sorted(org.departments))}")
