"""Household visits (走访) of a grid's service team, and the coverage (入户率) they add up to. Pure.

A visit is a one-event aggregate (``needle.events.visit.<id>.visit_recorded``). The household enters it only
as ``household_digest``: an HMAC under a secret kept outside the stream, so distinct households can be
counted (the same door twice is one household) while a door number, a low-entropy value, cannot be found
again by hashing every candidate.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from shared.config import OrgTree
from shared.domain.levels import Level
from shared.events.models import VisitKind, VisitRecorded

from . import ids
from .errors import Conflict, Invalid

CLOCK_SKEW = timedelta(minutes=5)  # a visit recorded by a device whose clock runs a little ahead
SECRET_FILE = "secrets/household.key"  # the HMAC secret, in the data directory beside the token key


def normalize_household(key: str) -> str:
    """One spelling of a household key: inner whitespace collapsed, case folded ("3-201 " == "3-201")."""
    return " ".join(key.split()).casefold()


def household_digest(secret: bytes, grid: str, household: str) -> str:
    """HMAC-SHA256 of the grid and the household's key in the grid's register (hex)."""
    msg = f"needle-household:{grid}\x00{normalize_household(household)}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def visit_id(subject: str, idempotency_key: str | None, now_ms: int, random80: int) -> str:
    """``v`` + 25 base32 characters: a hash of the caller and its key (the stream remembers the key), or
    time-ordered random."""
    if idempotency_key is not None:
        return "v" + ids.idempotent_issue_id(subject, f"visit\x00{ids.check_idempotency_key(idempotency_key)}")[1:]
    return "v" + ids.new_issue_id(now_ms, random80)[1:]


@dataclass(frozen=True, slots=True)
class RecordVisit:
    grid: str
    household: str  # already the digest: the core never sees the clear key
    kind: VisitKind
    by: str
    visited_at: datetime | None = None
    campaign: str | None = None
    note: str | None = None
    issues: tuple[str, ...] = ()
    request_hash: str | None = None


def request_hash(secret: bytes, body: dict[str, object]) -> str:
    """What an Idempotency-Key replay must match: the request with the household as its digest, under the
    same secret (a plain hash of a body holding a door number could be brute-forced)."""
    return hmac.new(secret, orjson.dumps(body, option=orjson.OPT_SORT_KEYS), hashlib.sha256).hexdigest()


def decide_visit(exists: bool, command: RecordVisit, now: datetime) -> list[VisitRecorded]:
    if exists:
        raise Conflict("visit already recorded")
    if command.kind == "campaign" and command.campaign is None:
        raise Invalid("a campaign visit names its campaign", field="campaign")
    if command.kind != "campaign" and command.campaign is not None:
        raise Invalid("only a visit of kind campaign names a campaign", field="campaign")
    visited_at = command.visited_at or now
    if visited_at > now + CLOCK_SKEW:
        raise Invalid("visited_at is in the future", field="visited_at")
    return [VisitRecorded(grid=command.grid, household=command.household, kind=command.kind,
                          campaign=command.campaign, visited_at=visited_at, by=command.by, note=command.note,
                          issues=command.issues, request_hash=command.request_hash)]


# -- coverage ---------------------------------------------------------------------------------------------------
COUNTS = ("visited", "visits", "issues_raised", "issues_resolved")


def rate(visited: int, households: int | None) -> float | None:
    return round(visited / households, 4) if households else None


def coverage_rows(org: OrgTree, area: str, counts: dict[str, dict[str, int]], target: float) -> dict[str, Any]:
    """Per grid under ``area`` and rolled up per area of the subtree: households, distinct households visited,
    入户率 (visited ÷ households, over the grids that declare households), visits, issues raised from the
    visits and how many of those are resolved; the grids below ``target``. ``counts``: grid -> COUNTS."""
    per_grid: list[dict[str, Any]] = []
    for g in org.grids_under(area):
        c = counts.get(g.id, {})
        r = rate(c.get("visited", 0), g.households)
        per_grid.append({"grid": g.id, "name": g.name, "parent": g.parent, "households": g.households,
                         **{k: int(c.get(k, 0)) for k in COUNTS}, "rate": r,
                         "below_target": r is not None and r < target})
    by_id = {row["grid"]: row for row in per_grid}

    def rollup(rows: list[dict[str, Any]]) -> dict[str, Any]:
        declared = [x for x in rows if x["households"] is not None]
        households = sum(x["households"] for x in declared)
        return {"grids": len(rows), "households": households, **{k: sum(x[k] for x in rows) for k in COUNTS},
                "rate": rate(sum(x["visited"] for x in declared), households),
                "below_target": sum(1 for x in rows if x["below_target"])}

    areas = [{"id": a.id, "name": a.name, "level": str(a.level), "parent": a.parent,
              **rollup([by_id[g.id] for g in org.grids_under(a.id)])}
             for a in org.subtree(area) if a.level != Level.grid]
    below = sorted((x for x in per_grid if x["below_target"]), key=lambda x: (x["rate"], x["grid"]))
    return {"target": target, "total": rollup(per_grid), "areas": areas, "grids": per_grid,
            "below_target": [{"grid": x["grid"], "name": x["name"], "rate": x["rate"]} for x in below]}


def recount(visits: Iterable[tuple[VisitRecorded, Iterable[str]]], resolved: set[str]) -> dict[str, dict[str, int]]:
    """The COUNTS per grid straight from visit events, each with the issues raised from it (its own ``issues``
    and the reports that name it), given the issues resolved: what the read model must agree with."""
    households: dict[str, set[str]] = {}
    issues: dict[str, set[str]] = {}
    visits_n: dict[str, int] = {}
    for v, raised in visits:
        households.setdefault(v.grid, set()).add(v.household)
        issues.setdefault(v.grid, set()).update(raised)
        visits_n[v.grid] = visits_n.get(v.grid, 0) + 1
    return {g: {"visited": len(households[g]), "visits": visits_n[g], "issues_raised": len(issues[g]),
                "issues_resolved": len(issues[g] & resolved)} for g in visits_n}
