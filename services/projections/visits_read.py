"""Household visits over the read models: the list, one visit, and coverage (入户率) per grid and per area.

Who reads: a supervisor over the grid (or area), the grid's own people (a grid worker over it, a handler of
its service team), admins. Every answer carries ``Needle-Seq`` and honours ``Needle-Min-Seq`` (api.py)."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from services.intake.security import Actor, Ctx, in_area
from services.intake.visits_api import check_grid, grid_people, team_grid
from shared.auth import Principal
from shared.config import format_duration
from shared.domain import visits as dv
from shared.domain.errors import Invalid, NotAllowed, NotFound

from . import queries
from .api import CSV_TOO, Fmt, MinSeq, _caught_up, _instant, _pool, _respond

router = APIRouter(tags=["visits"])


def _grid_readable(ctx: Any, p: Principal, grid: str) -> bool:
    return grid_people(ctx, p, grid) or (p.role == "supervisor" and in_area(ctx.org, p, grid))


def _scope_of(ctx: Any, p: Principal, grid: str | None) -> tuple[str, str | None]:
    """(area to list under, the one grid or None) for this reader."""
    if grid is not None:
        check_grid(ctx, grid)
        if not _grid_readable(ctx, p, grid):
            raise NotAllowed(f"grid {grid} is outside {p.role} scope {p.scope or '-'}")
        return grid, grid
    if p.role == "admin":
        return ctx.org.root.id, None
    if p.role in ("supervisor", "grid_worker"):
        return p.scope_id, None
    if (own := team_grid(ctx, p)) is not None:
        return own, own
    raise NotAllowed(f"role {p.role} cannot list visits (supervisors, and a grid's own people)")


def _coverage_area(ctx: Any, p: Principal, area: str | None) -> str:
    if p.role not in ("admin", "supervisor", "grid_worker") and team_grid(ctx, p) is None:
        raise NotAllowed(f"role {p.role} cannot read coverage (supervisors, and a grid's own people)")
    if area is not None and area not in ctx.org.areas:
        raise Invalid(f"unknown area {area!r}", field="area")
    if p.role == "handler":
        a = area or team_grid(ctx, p)
        if a != team_grid(ctx, p):
            raise NotAllowed(f"area {a} is not the grid of team {p.scope_id}")
        assert a is not None
        return a
    a = area or (ctx.org.root.id if p.role == "admin" else p.scope_id)
    if not in_area(ctx.org, p, a):
        raise NotAllowed(f"area {a} is outside scope {p.scope}")
    return str(a)


def _window(ctx: Any, from_: datetime | None, to: datetime | None) -> tuple[datetime, datetime]:
    """The visits' window: ``to`` defaults to now, ``from`` to the rulebook's coverage period before it."""
    until = _instant(to, "to") or datetime.now(UTC)
    since = _instant(from_, "from")
    if since is None:
        try:
            since = until - ctx.rulebook.coverage.period
        except OverflowError:
            raise Invalid("to is out of range", field="to") from None
    if since.tzinfo is None or until.tzinfo is None:
        raise Invalid("from and to need a UTC offset", field="from" if since.tzinfo is None else "to")
    if since > until:
        raise Invalid("from must not be after to", field="from")
    return since, until


@router.get("/v1/visits", responses=CSV_TOO)
async def list_visits(request: Request, ctx: Ctx, p: Actor, min_seq: MinSeq = None,
                      grid: Annotated[str | None, Query(max_length=64)] = None,
                      from_: Annotated[datetime | None, Query(alias="from")] = None, to: datetime | None = None,
                      limit: Annotated[int, Query(ge=1, le=500)] = 100, fmt: Fmt = None) -> Response:
    """Visits of one grid (or under the reader's area), newest first, within ``from``..``to`` (default: the
    rulebook's coverage period up to now). The household shows only as its HMAC."""
    area, _ = _scope_of(ctx, p, grid)
    since, until = _window(ctx, from_, to)
    seq = await _caught_up(ctx, min_seq)
    rows = await queries.list_visits(_pool(ctx), area=area, since=since, until=until, limit=limit)
    return _respond(request, {"items": rows, "from": since, "to": until, "sequence": seq}, seq, rows, fmt)


@router.get("/v1/visits/coverage")
async def get_coverage(request: Request, ctx: Ctx, p: Actor, min_seq: MinSeq = None,
                       area: Annotated[str | None, Query(max_length=64)] = None,
                       from_: Annotated[datetime | None, Query(alias="from")] = None,
                       to: datetime | None = None) -> Response:
    """入户率 per grid and rolled up per area: households (org file), distinct households visited, the rate,
    visits, issues raised from the visits and how many are resolved; the grids below the rulebook's target."""
    a = _coverage_area(ctx, p, area)
    since, until = _window(ctx, from_, to)
    seq = await _caught_up(ctx, min_seq)
    counts = await queries.coverage_counts(_pool(ctx), area=a, since=since, until=until)
    cov = ctx.rulebook.coverage
    body = {"area": a, "from": since, "to": until, "period": format_duration(cov.period),
            **dv.coverage_rows(ctx.org, a, counts, cov.target), "sequence": seq}
    return _respond(request, body, seq)


@router.get("/v1/visits/{visit_id}")
async def get_visit(request: Request, visit_id: str, ctx: Ctx, p: Actor, min_seq: MinSeq = None) -> Response:
    """One visit with the issues raised from it (its own list and every report that names it)."""
    if not (1 <= len(visit_id) <= 40) or not visit_id.isalnum():
        raise NotFound(f"visit {visit_id} not found", field="id")
    seq = await _caught_up(ctx, min_seq)
    row = await queries.visit(_pool(ctx), visit_id)
    if row is None:
        raise NotFound(f"visit {visit_id} not found", field="id")
    if not _grid_readable(ctx, p, row["grid"]):
        raise NotAllowed(f"visit {visit_id} is outside {p.role} scope {p.scope or '-'}")
    return _respond(request, row, seq)
