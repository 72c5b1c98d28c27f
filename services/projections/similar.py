"""合并办理: the open issues of the same category near a report (``similar: {radius_m, within}`` in the rulebook),
from the read models: a bounding box on the lat/lon columns in Postgres, then the exact distance here."""
from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import asyncpg

from shared.config.rulebook import Similar
from shared.domain.issue import ISSUE_OPEN, IssueState

EARTH_RADIUS_M = 6_371_008.8
SIMILAR_FIELDS = "id, grid, category, title, status, urgency, reported_at, lat, lon"


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """The great-circle distance in metres (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def bounding_box(lat: float, lon: float, radius_m: float) -> tuple[float, float, float, float]:
    """(min lat, max lat, min lon, max lon) holding every point within ``radius_m`` (a little more)."""
    dlat = math.degrees(radius_m / EARTH_RADIUS_M)
    dlon = dlat / max(math.cos(math.radians(lat)), 1e-6)
    return lat - dlat, lat + dlat, max(lon - dlon, -180.0), min(lon + dlon, 180.0)


def nearby(state: IssueState, rows: list[dict[str, Any]], rule: Similar) -> list[dict[str, Any]]:
    """The candidate rows within the radius of ``state``'s location, nearest first, with ``distance_m``."""
    assert state.location is not None
    out = []
    for r in rows:
        d = distance_m(state.location.lat, state.location.lon, r["lat"], r["lon"])
        if d <= rule.radius_m and r["id"] != state.id:
            out.append({k: v for k, v in r.items() if k not in ("lat", "lon")} | {"distance_m": round(d, 1)})
    return sorted(out, key=lambda r: (r["distance_m"], r["id"]))


async def find_similar(pool: asyncpg.Pool, state: IssueState, rule: Similar) -> list[dict[str, Any]]:
    """Open issues of ``state``'s category within ``rule`` of it (none for an issue without a location)."""
    if state.location is None or state.reported_at is None:
        return []
    lat0, lat1, lon0, lon1 = bounding_box(state.location.lat, state.location.lon, rule.radius_m)
    since: datetime = state.reported_at - rule.within
    until: datetime = state.reported_at + rule.within
    rows = await pool.fetch(
        f"SELECT {SIMILAR_FIELDS} FROM issues WHERE category = $1 AND status = ANY($2::text[]) AND id <> $3 "
        "AND lat BETWEEN $4 AND $5 AND lon BETWEEN $6 AND $7 AND reported_at BETWEEN $8 AND $9 "
        "ORDER BY reported_at DESC LIMIT 500",
        state.category, sorted(ISSUE_OPEN), state.id, lat0, lat1, lon0, lon1, since, until)
    return nearby(state, [dict(r) for r in rows], rule)
