"""Read-model queries for supervisors and handlers (keyset pagination, pre-aggregated stats)."""
from __future__ import annotations

import base64
from collections import defaultdict
from datetime import UTC, date, datetime
from typing import Any

import asyncpg

from .model import DEPT_RATES, RATES, rates

ISSUE_FIELDS = ("id, grid, category, title, urgency, status, level, owner_area, reported_at, dispatched_at, "
                "closed_at, closed_on_time, lead_task, lead_department, lead_status, next_due, reopen_count, "
                "escalations, satisfaction, version, seq")


def encode_cursor(reported_at: datetime, issue_id: str) -> str:
    return base64.urlsafe_b64encode(f"{reported_at.isoformat()}|{issue_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """ValueError for anything encode_cursor did not make (Postgres would refuse a NUL or a year past 9999)."""
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    ts, _, issue_id = raw.partition("|")
    reported_at = datetime.fromisoformat(ts)
    if "\x00" in issue_id:
        raise ValueError("NUL in cursor")
    try:
        return (reported_at.astimezone(UTC) if reported_at.tzinfo else reported_at), issue_id
    except OverflowError:
        raise ValueError("cursor out of range") from None


async def list_issues(pool: asyncpg.Pool, *, area: str, status: str | None, category: str | None,
                      overdue: bool | None, reporter: str | None = None, since: datetime | None,
                      until: datetime | None, limit: int,
                      cursor: tuple[datetime, str] | None, now: datetime) -> tuple[list[dict[str, Any]], str | None]:
    where = ["areas @> ARRAY[$1]::text[]"]
    args: list[Any] = [area]

    def arg(v: Any) -> str:
        args.append(v)
        return f"${len(args)}"

    if status:
        where.append(f"status = ANY({arg(status.split(','))}::text[])")
    if category:
        where.append(f"category = {arg(category)}")
    if reporter:
        where.append(f"reporter = {arg(reporter)}")
    if overdue is True:
        where.append(f"next_due < {arg(now)}")
    elif overdue is False:
        where.append(f"(next_due IS NULL OR next_due >= {arg(now)})")
    if since:
        where.append(f"reported_at >= {arg(since)}")
    if until:
        where.append(f"reported_at < {arg(until)}")
    if cursor:
        where.append(f"(reported_at, id) < ({arg(cursor[0])}, {arg(cursor[1])})")
    sql = (f"SELECT {ISSUE_FIELDS} FROM issues WHERE {' AND '.join(where)} "
           f"ORDER BY reported_at DESC, id DESC LIMIT {arg(limit + 1)}")
    rows = [dict(r) for r in await pool.fetch(sql, *args)]
    nxt = encode_cursor(rows[limit - 1]["reported_at"], rows[limit - 1]["id"]) if len(rows) > limit else None
    for r in rows:
        r["overdue"] = r["next_due"] is not None and r["next_due"] < now
    return rows[:limit], nxt


async def list_overdue(pool: asyncpg.Pool, *, area: str, now: datetime, limit: int = 500) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT {ISSUE_FIELDS} FROM issues WHERE areas @> ARRAY[$1]::text[] AND next_due < $2 "
        "ORDER BY next_due ASC LIMIT $3", area, now, limit)
    out = []
    for r in rows:
        d = dict(r)
        d["overdue_seconds"] = int((now - d["next_due"]).total_seconds())
        d["holder"] = d["lead_department"]
        d["clock"] = ("review" if d["status"] == "pending_review"  # 受理: held past the review clock
                      else "acknowledge" if d["lead_status"] == "dispatched" else "resolve")
        out.append(d)
    return out


async def list_tasks(pool: asyncpg.Pool, *, department: str, status: str | None, limit: int,
                     now: datetime) -> list[dict[str, Any]]:
    args: list[Any] = [department]
    sql = "SELECT * FROM tasks WHERE department = $1"
    if status:
        args.append(status.split(","))
        sql += " AND status = ANY($2::text[])"
    args.append(limit)
    sql += f" ORDER BY dispatched_at DESC LIMIT ${len(args)}"
    out = []
    for r in await pool.fetch(sql, *args):
        d = dict(r)
        due = d["acknowledge_due"] if d["status"] == "dispatched" else d["resolve_due"]
        d["overdue"] = d["status"] in ("dispatched", "acknowledged") and due < now
        out.append(d)
    return out


async def _sum(pool: asyncpg.Pool, scope: str, keys: list[str], since: date, until: date
               ) -> dict[str, dict[str, int]]:
    rows = await pool.fetch(
        "SELECT key, metric, sum(n)::bigint AS n FROM stats_daily WHERE scope = $1 AND key = ANY($2::text[]) "
        "AND day >= $3 AND day <= $4 GROUP BY key, metric", scope, keys, since, until)
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for r in rows:
        out[r["key"]][r["metric"]] = int(r["n"])
    return out


async def sum_scope(pool: asyncpg.Pool, scope: str, keys: list[str], since: date, until: date
                    ) -> dict[str, dict[str, int]]:
    """Counters of ``keys`` summed over the days [since, until] (scores of a month)."""
    return dict(await _sum(pool, scope, keys, since, until)) if keys else {}


def _with_rates(counts: dict[str, int], table: dict[str, tuple[str, str]]) -> dict[str, Any]:
    body: dict[str, Any] = {"counts": counts, "rates": rates(counts, table)}
    n = counts.get("issues_dispatched", 0)
    if table is RATES:
        body["avg_dispatch_seconds"] = round(counts.get("dispatch_ms_sum", 0) / n / 1000, 3) if n else None
    return body


async def stats(pool: asyncpg.Pool, *, area: str, children: list[str], departments: list[str], since: date,
                until: date) -> dict[str, Any]:
    # the statuses first: the counters read after them are at least as recent (two reads, not one snapshot)
    statuses = {r["status"]: int(r["n"]) for r in await pool.fetch(
        "SELECT status, count(*) AS n FROM issues WHERE areas @> ARRAY[$1]::text[] GROUP BY status", area)}
    area_counts = await _sum(pool, "area", [area, *children], since, until)
    dept_counts = await _sum(pool, "dept", departments, since, until) if departments else {}
    return {
        "area": area, "from": since.isoformat(), "to": until.isoformat(),
        "statuses": statuses,  # the issues under the area now, by status (pending_review, rejected, merged ...)
        "overall": _with_rates(area_counts.get(area, {}), RATES),
        "areas": {c: _with_rates(area_counts.get(c, {}), RATES) for c in children},
        "departments": {d: _with_rates(dept_counts.get(d, {}), DEPT_RATES) for d in departments},
    }


async def daily_series(pool: asyncpg.Pool, *, area: str, since: date, until: date) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT day, metric, n FROM stats_daily WHERE scope = 'area' AND key = $1 AND day >= $2 AND day <= $3 "
        "ORDER BY day", area, since, until)
    days: dict[date, dict[str, int]] = defaultdict(dict)
    for r in rows:
        days[r["day"]][r["metric"]] = int(r["n"])
    return [{"day": d.isoformat(), **_with_rates(c, RATES)} for d, c in sorted(days.items())]


async def audit(pool: asyncpg.Pool, issue_id: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await pool.fetch("SELECT * FROM audit WHERE issue_id = $1 ORDER BY seq", issue_id)]


# -- household visits (走访) ------------------------------------------------------------------------------------
VISIT_FIELDS = "id, grid, household, kind, campaign, visited_at, visitor AS by, note, issues, seq"
RESOLVED = "(i.first_resolved_at IS NOT NULL OR i.status = 'closed')"


async def list_visits(pool: asyncpg.Pool, *, area: str, since: datetime, until: datetime, limit: int
                      ) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT {VISIT_FIELDS} FROM visits WHERE areas @> ARRAY[$1]::text[] AND visited_at >= $2 "
        "AND visited_at < $3 ORDER BY visited_at DESC, id DESC LIMIT $4", area, since, until, limit)
    return [dict(r) for r in rows]


async def visit(pool: asyncpg.Pool, visit_id: str) -> dict[str, Any] | None:
    row = await pool.fetchrow(f"SELECT {VISIT_FIELDS} FROM visits WHERE id = $1", visit_id)
    return dict(row) if row is not None else None


async def coverage_counts(pool: asyncpg.Pool, *, area: str, since: datetime, until: datetime
                          ) -> dict[str, dict[str, int]]:
    """Per grid under ``area``, of the visits in [since, until): distinct households, visits, distinct issues
    raised from them and how many of those are resolved (first resolved, or closed)."""
    rows = await pool.fetch(
        "WITH v AS (SELECT grid, household, issues FROM visits WHERE areas @> ARRAY[$1]::text[] "
        "AND visited_at >= $2 AND visited_at < $3), "
        "c AS (SELECT grid, count(DISTINCT household) AS visited, count(*) AS visits FROM v GROUP BY grid), "
        "r AS (SELECT v.grid, count(DISTINCT x.id) AS raised, "
        f"count(DISTINCT x.id) FILTER (WHERE {RESOLVED}) AS resolved "
        "FROM v CROSS JOIN LATERAL unnest(v.issues) AS x(id) LEFT JOIN issues i ON i.id = x.id GROUP BY v.grid) "
        "SELECT c.grid, c.visited, c.visits, coalesce(r.raised, 0) AS raised, coalesce(r.resolved, 0) AS resolved "
        "FROM c LEFT JOIN r ON r.grid = c.grid", area, since, until)
    return {r["grid"]: {"visited": int(r["visited"]), "visits": int(r["visits"]), "issues_raised": int(r["raised"]),
                        "issues_resolved": int(r["resolved"])} for r in rows}


async def campaign_reach(pool: asyncpg.Pool, campaign: str, grids: list[str]) -> dict[str, int]:
    """Distinct households reached by the campaign's visits, per grid."""
    rows = await pool.fetch(
        "SELECT grid, count(DISTINCT household) AS n FROM visits WHERE campaign = $1 AND grid = ANY($2::text[]) "
        "GROUP BY grid", campaign, grids)
    return {r["grid"]: int(r["n"]) for r in rows}
