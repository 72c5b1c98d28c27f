"""Supervisors' and handlers' queries over the read models (same HTTP surface as intake).

Every response carries ``Needle-Seq``: the stream sequence the read models reflect. A request
with ``Needle-Min-Seq`` waits (bounded) until they reflect that write, else 503 + Retry-After."""
from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request, Response

from services.intake.context import AppContext
from services.intake.schemas import NO_NUL
from services.intake.security import Actor, Ctx, in_area, require_role
from shared.auth import Principal
from shared.domain import ids
from shared.domain.errors import Invalid, NotAllowed, Unavailable

from . import queries

if TYPE_CHECKING:
    from .service import ReadModels

router = APIRouter(tags=["read models"])
MinSeq = Annotated[int | None, Header(alias="Needle-Min-Seq", ge=0)]
MAX_WAIT_S = 5.0


def _default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat().replace("+00:00", "Z")
    if isinstance(o, date):
        return o.isoformat()
    raise TypeError


async def _caught_up(ctx: AppContext, min_seq: int | None) -> int:
    worker = read_models(ctx).progress
    if min_seq is not None and not await worker.wait_for(min_seq, MAX_WAIT_S):
        raise Unavailable(f"read models reflect sequence {worker.seq}, not yet {min_seq}; retry shortly",
                          field="Needle-Min-Seq", current_seq=worker.seq)
    return int(worker.seq)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: a string starting with = + - @ TAB or CR (a formula, or
    the start of one: ``=HYPERLINK(...)`` in a title) gets a leading ``'`` (OWASP's CSV injection advice).
    Dates as in JSON; numbers and everything else as they are."""
    if isinstance(value, datetime | date):
        return _default(value)
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _respond(request: Request, body: Any, seq: int, rows_for_csv: list[dict[str, Any]] | None = None,
             fmt: str | None = None) -> Response:
    headers = {"Needle-Seq": str(seq)}
    wants_csv = fmt == "csv" or (fmt is None and "text/csv" in request.headers.get("accept", ""))
    if rows_for_csv is not None and wants_csv:
        buf = io.StringIO()
        cols = list(rows_for_csv[0]) if rows_for_csv else ["id"]
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows_for_csv:
            w.writerow({k: csv_cell(v) for k, v in r.items()})
        return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                        headers=headers | {"Content-Disposition": "attachment; filename=needle.csv"})
    return Response(orjson.dumps(body, default=_default, option=orjson.OPT_UTC_Z), media_type="application/json",
                    headers=headers)


def _area_for(ctx: AppContext, p: Principal, area: str | None) -> str:
    if p.role == "admin":
        area = area or ctx.org.root.id
    elif p.role in ("supervisor", "grid_worker"):
        area = area or p.scope_id
    else:
        raise NotAllowed(f"role {p.role} cannot list issues")
    if area not in ctx.org.areas:
        raise Invalid(f"unknown area {area!r}", field="area")
    if not in_area(ctx.org, p, area):
        raise NotAllowed(f"area {area} is outside scope {p.scope}")
    return area


def read_models(ctx: AppContext) -> ReadModels:
    """The read models this process serves; 503 where it serves none."""
    if ctx.read_models is None:
        raise Unavailable("read models are not running in this process")
    return ctx.read_models


def _pool(ctx: AppContext) -> Any:
    return read_models(ctx).pool


def _instant(value: datetime | None, field: str) -> datetime | None:
    """A query's date-time in UTC; one whose offset moves it outside years 1-9999 is 422 (was a 500)."""
    if value is None or value.tzinfo is None:
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise Invalid(f"{field} is out of range", field=field) from None


def _window(from_: date | None, to: date | None) -> tuple[date, date]:
    """The stats' days: ``to`` defaults to tomorrow, ``from`` to 30 days before ``to`` (never before year 1)."""
    until = to or datetime.now(UTC).date() + timedelta(days=1)
    return from_ or until - min(timedelta(days=30), until - date.min), until


Fmt = Annotated[str | None, Query(alias="format", pattern="^(json|csv)$")]
# the lists answer CSV too (``?format=csv`` or ``Accept: text/csv``): say so in the OpenAPI document
CSV_TOO: dict[int | str, dict[str, Any]] = {200: {"content": {"text/csv": {"schema": {"type": "string"}}}}}


@router.get("/v1/issues", responses=CSV_TOO)
async def list_issues(request: Request, ctx: Ctx, p: Actor, min_seq: MinSeq = None,
                      area: Annotated[str | None, Query(max_length=64)] = None,
                      status: Annotated[str | None, Query(max_length=100, pattern=NO_NUL)] = None,
                      category: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
                      reporter: Annotated[str | None, Query(
                          max_length=200, pattern=NO_NUL,
                          description="only the issues this token subject reported; ``me``: the caller's")] = None,
                      overdue: bool | None = None, from_: Annotated[datetime | None, Query(alias="from")] = None,
                      to: datetime | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                      cursor: Annotated[str | None, Query(max_length=200)] = None, fmt: Fmt = None) -> Response:
    """Issues under an area (default: the caller's), newest first, filters combined, keyset pages."""
    a = _area_for(ctx, p, area)
    seq = await _caught_up(ctx, min_seq)
    try:
        cur = queries.decode_cursor(cursor) if cursor else None
    except ValueError:
        raise Invalid("malformed cursor", field="cursor") from None
    since, until = _instant(from_, "from"), _instant(to, "to")
    who = p.subject if reporter == "me" else reporter
    rows, nxt = await queries.list_issues(_pool(ctx), area=a, status=status, category=category, overdue=overdue,
                                          reporter=who, since=since, until=until, limit=limit, cursor=cur,
                                          now=datetime.now(UTC))
    return _respond(request, {"items": rows, "next_cursor": nxt, "sequence": seq}, seq, rows, fmt)


@router.get("/v1/overdue", responses=CSV_TOO)
async def list_overdue(request: Request, ctx: Ctx, p: Actor, min_seq: MinSeq = None,
                       area: Annotated[str | None, Query(max_length=64)] = None, fmt: Fmt = None) -> Response:
    """Open issues past their lead's deadline, most overdue first, with who holds each."""
    a = _area_for(ctx, p, area)
    seq = await _caught_up(ctx, min_seq)
    rows = await queries.list_overdue(_pool(ctx), area=a, now=datetime.now(UTC))
    return _respond(request, {"items": rows, "sequence": seq}, seq, rows, fmt)


@router.get("/v1/tasks", responses=CSV_TOO)
async def list_tasks(request: Request, ctx: Ctx, p: Actor, min_seq: MinSeq = None,
                     status: Annotated[str | None, Query(max_length=100, pattern=NO_NUL)] = None,
                     department: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
                     limit: Annotated[int, Query(ge=1, le=500)] = 100, fmt: Fmt = None) -> Response:
    """A handler's inbox: its department's tasks (admins may name a department)."""
    require_role(p, "handler")
    dept = p.scope_id if p.role == "handler" else department
    if not dept:
        raise Invalid("department is required for admins", field="department")
    seq = await _caught_up(ctx, min_seq)
    rows = await queries.list_tasks(_pool(ctx), department=dept, status=status, limit=limit, now=datetime.now(UTC))
    return _respond(request, {"items": rows, "sequence": seq}, seq, rows, fmt)


@router.get("/v1/stats")
async def get_stats(request: Request, ctx: Ctx, p: Actor, min_seq: MinSeq = None,
                    area: Annotated[str | None, Query(max_length=64)] = None,
                    from_: Annotated[date | None, Query(alias="from")] = None, to: date | None = None) -> Response:
    """Every rate of DOMAIN.md with the counts behind it: overall, per child area, per department."""
    if p.role not in ("supervisor", "admin"):
        raise NotAllowed(f"role {p.role} cannot read stats")
    a = _area_for(ctx, p, area)
    since, until = _window(from_, to)
    if since > until:
        raise Invalid("from must not be after to", field="from")
    seq = await _caught_up(ctx, min_seq)
    children = [c.id for c in ctx.org.children(a)]
    depts = [d.id for d in ctx.org.departments.values() if ctx.org.is_under(d.area, a)]
    body = await queries.stats(_pool(ctx), area=a, children=children, departments=depts, since=since, until=until)
    body["sequence"] = seq
    return _respond(request, body, seq)


@router.get("/v1/stats/series")
async def get_series(request: Request, ctx: Ctx, p: Actor, area: Annotated[str | None, Query(max_length=64)] = None,
                     from_: Annotated[date | None, Query(alias="from")] = None, to: date | None = None) -> Response:
    """Day buckets of the rates for charts."""
    if p.role not in ("supervisor", "admin"):
        raise NotAllowed(f"role {p.role} cannot read stats")
    a = _area_for(ctx, p, area)
    since, until = _window(from_, to)
    seq = await _caught_up(ctx, None)
    return _respond(request, {"area": a, "days": await queries.daily_series(_pool(ctx), area=a, since=since,
                                                                             until=until)}, seq)


@router.get("/v1/issues/{issue_id}/audit")
async def get_audit(request: Request, issue_id: str, ctx: Ctx, p: Actor) -> Response:
    """Who did what when (supervisors and admins)."""
    if p.role not in ("supervisor", "admin"):
        raise NotAllowed(f"role {p.role} cannot read the audit view")
    ids.check_issue_id(issue_id)  # 422 for what cannot be an issue id (a NUL in it was a 500 from Postgres)
    seq = await _caught_up(ctx, None)
    rows = await queries.audit(_pool(ctx), issue_id)
    if rows and p.role == "supervisor":
        from shared.commanding import load_existing_state

        state, _ = await load_existing_state(ctx.store, issue_id)
        if not in_area(ctx.org, p, state.grid):
            raise NotAllowed(f"issue {issue_id} is outside scope {p.scope}")
    return _respond(request, {"items": rows}, seq)


@router.get("/v1/issues/{issue_id}/similar")
async def get_similar(request: Request, issue_id: str, ctx: Ctx, p: Actor) -> Response:
    """合并办理: the open issues of the same category within the rulebook's ``similar`` radius and window of
    this one (possible duplicates), nearest first, for whoever may read the issue."""
    from services.intake.issues_api import readable_issue

    from .similar import find_similar

    state = await readable_issue(ctx, p, issue_id)
    seq = await _caught_up(ctx, None)
    rule = ctx.rulebook.similar_for(state.category) if state.category in ctx.rulebook.categories else None
    rows = await find_similar(_pool(ctx), state, rule) if rule is not None else []
    body = {"items": rows, "radius_m": rule.radius_m if rule else None,
            "within_s": int(rule.within.total_seconds()) if rule else None, "sequence": seq}
    return _respond(request, body, seq)
