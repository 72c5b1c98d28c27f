"""考核 over the read models: monthly scores and rankings (``GET /v1/scores``), pure scoring in
:mod:`shared.domain.scoring`, the counters from ``stats_daily``, the rules from the rulebook in force in the month
(RulebookPublished events of the stream)."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Query, Request, Response

from services.intake.security import Actor, Ctx
from shared.config import OrgTree, Rulebook
from shared.domain import scoring
from shared.domain.errors import Invalid, NotAllowed, Unavailable
from shared.domain.levels import Level

from . import queries
from .api import MinSeq, _area_for, _caught_up, _pool, _respond

router = APIRouter(tags=["scores"])
By = Literal["department", "area"]


def rules_summary(rb: Rulebook) -> dict[str, Any]:
    s = rb.scoring
    return {"version": rb.version, "weights": dict(s.weights), "deductions": dict(s.deductions), "caps": dict(s.caps)}


def units(org: OrgTree, area: str, by: str, level: str | None) -> dict[str, str]:
    """Unit id -> display name: the departments serving under ``area``, or its areas one level down (or at
    ``level``)."""
    if by == "department":
        return {d.id: d.name for d in org.departments.values() if org.is_under(d.area, area)}
    if level is None:
        return {a.id: a.name for a in org.children(area)}
    return {a.id: a.name for a in org.subtree(area) if a.level == level and a.id != area}


async def compute(pool: asyncpg.Pool, org: OrgTree, history: list[tuple[datetime, Rulebook]], *, area: str,
                  period: str, by: str, level: str | None = None, tz: Any = None) -> dict[str, Any]:
    """The ranked scores of a month with the numbers behind each and the rules version that made them."""
    if not history:
        raise Unavailable("no rulebook was published yet", field="period")
    tz = tz or history[-1][1].tz
    try:
        p = scoring.month(period, tz)
    except ValueError as exc:
        raise Invalid(str(exc), field="period") from None
    rb = scoring.rules_in_force(history, p)
    names = units(org, area, by, level)
    counts = await queries.sum_scope(pool, "dept" if by == "department" else "area", list(names),
                                     p.first_day, p.last_day)
    ranked = scoring.scores({u: counts.get(u, {}) for u in names}, rb.scoring, by)
    for row in ranked:
        row["name"] = names[row["id"]]
    return {"period": p.name, "from": p.first_day.isoformat(), "to": p.last_day.isoformat(), "area": area,
            "by": by, "level": level, "rules_version": rb.version, "rules": rules_summary(rb), "items": ranked}


async def trend(pool: asyncpg.Pool, org: OrgTree, history: list[tuple[datetime, Rulebook]], *, area: str,
                period: str, by: str, months: int) -> list[dict[str, Any]]:
    """The same ranking over the ``months`` months ending with ``period`` (oldest first)."""
    tz = history[-1][1].tz
    out = []
    for p in scoring.previous_months(scoring.month(period, tz), months, tz):
        body = await compute(pool, org, history, area=area, period=p.name, by=by)
        out.append({"period": p.name, "rules_version": body["rules_version"],
                    "scores": {r["id"]: r["score"] for r in body["items"]}})
    return out


async def _history(ctx: Any) -> list[tuple[datetime, Rulebook]]:
    if ctx.nc is None:
        raise Unavailable("the event stream is not reachable from this process", field="period")
    from shared.rulebooks import history

    hist = await history(ctx.nc)
    if not hist:  # nothing published (an embedded test stack): the rulebook this process runs
        hist = [(datetime.min.replace(tzinfo=ctx.rulebook.tz), ctx.rulebook)]
    return hist


@router.get("/v1/scores")
async def get_scores(request: Request, ctx: Ctx, p: Actor, min_seq: MinSeq = None,
                     period: Annotated[str, Query(pattern=r"^\d{4}-\d{2}$")] = "",
                     by: By = "department", area: Annotated[str | None, Query(max_length=64)] = None,
                     level: Level | None = None,
                     months: Annotated[int, Query(ge=0, le=24)] = 0) -> Response:
    """考核: each unit's score of the month (``period=YYYY-MM``, rulebook timezone), rank, and the rates and
    deductions behind it, scored by the rules in force in that month. ``months=N`` adds the trend."""
    if p.role not in ("supervisor", "admin"):
        raise NotAllowed(f"role {p.role} cannot read scores")
    if not period:
        raise Invalid("period is required (YYYY-MM)", field="period")
    a = _area_for(ctx, p, area)
    seq = await _caught_up(ctx, min_seq)
    hist = await _history(ctx)
    lv = level.value if level is not None else None
    body = await compute(_pool(ctx), ctx.org, hist, area=a, period=period, by=by, level=lv)
    if months:
        body["trend"] = await trend(_pool(ctx), ctx.org, hist, area=a, period=period, by=by, months=months)
    body["sequence"] = seq
    return _respond(request, body, seq)


XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


@router.get("/v1/reports/monthly", responses={200: {"content": {
    "text/html": {"schema": {"type": "string"}}, "text/csv": {"schema": {"type": "string"}},
    XLSX: {"schema": {"type": "string", "format": "binary"}}}}})
async def get_monthly_report(ctx: Ctx, p: Actor, min_seq: MinSeq = None,
                             period: Annotated[str, Query(pattern=r"^\d{4}-\d{2}$")] = "",
                             area: Annotated[str | None, Query(max_length=64)] = None,
                             fmt: Annotated[Literal["html", "csv", "xlsx", "json"], Query(alias="format")] = "html"
                             ) -> Response:
    """The monthly 通报 (rankings, rules version, worst overdue cases) as a printable page, CSV or XLSX."""
    from . import report

    if p.role not in ("supervisor", "admin"):
        raise NotAllowed(f"role {p.role} cannot read reports")
    if not period:
        raise Invalid("period is required (YYYY-MM)", field="period")
    a = _area_for(ctx, p, area)
    seq = await _caught_up(ctx, min_seq)
    rep = await report.build(_pool(ctx), ctx.org, await _history(ctx), area=a, period=period)
    headers = {"Needle-Seq": str(seq)}
    name = f"tongbao-{a}-{period}"
    if fmt == "csv":
        return Response(report.to_csv(rep).encode("utf-8-sig"), media_type="text/csv; charset=utf-8",
                        headers=headers | {"Content-Disposition": f"attachment; filename={name}.csv"})
    if fmt == "xlsx":
        return Response(report.to_xlsx(rep), media_type=XLSX,
                        headers=headers | {"Content-Disposition": f"attachment; filename={name}.xlsx"})
    if fmt == "json":
        import orjson

        return Response(orjson.dumps(rep, option=orjson.OPT_UTC_Z), media_type="application/json", headers=headers)
    return Response(report.to_html(rep), media_type="text/html; charset=utf-8",
                    headers=headers | {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                                                  "frame-ancestors 'none'"})
