"""The supervisors' (督办) live dashboard: a static page over the read-model queries, plus an SSE nudge.

* ``GET /dashboard``: the HTML shell (no auth: it holds no data). The page takes the token from
  ``#token=...`` (or a login box; kept in sessionStorage) and the area from ``?area=``, then reads
  ``/v1/stats``, ``/v1/stats/series``, ``/v1/overdue``, ``/v1/visits/coverage`` (入户率) and ``/dashboard/org``
  with ``Authorization: Bearer``.
* ``GET /dashboard/static/{file}``: the page's js/css and the vendored Chart.js (an allowlist, no path walking).
* ``GET /dashboard/org?area=``: names for the area tree, departments (with their kind), kinds (the org's
  ``kinds:`` display names) and categories, the areas' GeoJSON ``boundaries`` and ``locations`` (the map), and the
  configuration gaps under the area: the kinds the rulebook
  names that no department serves at some owner area (``shared.config.crosscheck.configuration_gaps``; a
  lead there goes to 兜底, a co-handler is not dispatched) (supervisor/admin).
* ``GET /v1/map?area=``: the map of an area in the caller's scope (names, levels, boundaries, locations), for the
  grid worker's page too (grid worker, supervisor, admin).
* ``GET /dashboard/stream?area=&access_token=``: Server-Sent Events. EventSource cannot send headers, so the
  token comes in the query string and goes through the same verifier. Emits ``hello`` on connect and
  ``changed`` ``{"seq": n}`` after the projection worker commits a batch that touched an issue or a household
  visit under the area; sse-starlette sends a ``: ping`` comment every 15 s. The page then refetches (debounced).
  The token is checked again every minute: an expired or revoked token ends the stream (event ``expired``).
"""
from __future__ import annotations

import asyncio
import mimetypes
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from shapely.geometry import mapping
from sse_starlette import EventSourceResponse, ServerSentEvent

from services.intake.context import AppContext
from services.intake.security import Actor, Ctx, check_rate, in_area
from services.intake.streams import slots_of
from shared.auth import Principal, TokenError
from shared.config import OrgTree, Rulebook
from shared.config.crosscheck import configuration_gaps
from shared.domain.errors import Invalid, NotAllowed, NotFound

from .api import read_models

router = APIRouter(tags=["dashboard"])

STATIC_DIR = Path(__file__).parent / "static"
PING_S = 15.0  # heartbeat comment, keeps proxies from closing an idle stream
WAIT_S = 5.0  # longest wait on the worker before re-checking the token and the client
MIN_GAP_S = 0.25  # at most four change checks a second per stream, however fast batches commit
REVERIFY_S = 60.0
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _static_files() -> dict[str, Path]:
    """Every servable file, by its path under ``static/`` (computed once: requests never touch the fs tree)."""
    if not STATIC_DIR.is_dir():
        return {}
    return {p.relative_to(STATIC_DIR).as_posix(): p for p in STATIC_DIR.rglob("*")
            if p.is_file() and p.suffix in (".js", ".css", ".html", ".svg", ".md")}


STATIC = _static_files()


def supervisor_area(ctx: AppContext, p: Principal, area: str | None) -> str:
    """The area a supervisor (or admin) may watch: the requested one if in scope, else their own."""
    if p.role not in ("supervisor", "admin"):
        raise NotAllowed(f"role {p.role} cannot watch the dashboard (needs supervisor)")
    chosen = area or (p.scope_id if p.role == "supervisor" else ctx.org.root.id)
    if chosen not in ctx.org.areas:
        raise Invalid(f"unknown area {chosen!r}", field="area")
    if not in_area(ctx.org, p, chosen):
        raise NotAllowed(f"area {chosen} is outside scope {p.scope}")
    return chosen


_GAPS: dict[tuple[int, int], list[dict[str, Any]]] = {}  # (id(org), id(rulebook)) -> every gap (org-wide)


def gaps_under(org: OrgTree, rulebook: Rulebook, area: str) -> list[dict[str, Any]]:
    """The configuration gaps of the rulebook in force over ``org``, restricted to owner areas under ``area``.
    Computed once per (org, rulebook) pair: a published rulebook is a new object, hence a new entry."""
    key = (id(org), id(rulebook))
    every = _GAPS.get(key)
    if every is None:
        _GAPS.clear()  # only the pair in force is worth keeping
        every = _GAPS[key] = configuration_gaps(rulebook, org)
    out = []
    for gap in every:
        areas = [a for a in gap["areas"] if org.is_under(a, area)]
        if areas:
            out.append(gap | {"areas": areas})
    return out


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> Response:
    """The page shell; data comes from the JSON endpoints with the supervisor's token."""
    page = STATIC.get("dashboard.html")
    if page is None:
        raise NotFound("dashboard assets are not installed")
    return FileResponse(page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


@router.get("/dashboard/static/{name:path}", include_in_schema=False)
async def dashboard_static(name: str) -> Response:
    path = STATIC.get(name)
    if path is None:
        raise NotFound(f"no dashboard asset {name!r}")
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if media.startswith("text/") or media.endswith("javascript"):
        media += "; charset=utf-8"
    cache = "public, max-age=86400" if name.startswith("vendor/") else "no-cache"
    return FileResponse(path, media_type=media, headers={"Cache-Control": cache})


@router.get("/dashboard/org")
async def dashboard_org(ctx: Ctx, p: Actor, area: Annotated[str | None, Query(max_length=64)] = None) -> Response:
    """The watched area, the path down to it from the caller's scope, its children, and display names."""
    a = supervisor_area(ctx, p, area)
    org = ctx.org
    scope_root = org.root.id if p.role == "admin" else p.scope_id
    path = []
    for anc in org.ancestors(a):
        path.append({"id": anc.id, "name": anc.name, "level": str(anc.level)})
        if anc.id == scope_root:
            break
    subtree = org.subtree(a)
    body: dict[str, Any] = {
        "area": {"id": a, "name": org.areas[a].name, "level": str(org.areas[a].level)},
        "path": list(reversed(path)),
        "children": [{"id": c.id, "name": c.name, "level": str(c.level), "leaf": not org.children(c.id)}
                     for c in org.children(a)],
        "areas": {x.id: {"name": x.name, "level": str(x.level), "parent": x.parent, "households": x.households}
                  for x in subtree},
        "departments": {d.id: {"name": d.name, "kind": d.kind, "area": d.area} for d in org.departments.values()},
        "kinds": {k: org.kind_name(k) for k in sorted(org.kinds)},
        "categories": {c.id: c.name for c in ctx.rulebook.categories.values()},
        "gaps": gaps_under(org, ctx.rulebook, a),
        # the map (no tile server): each area's GeoJSON boundary and point under the watched area, when declared
        "boundaries": {x.id: mapping(org.boundaries[x.id]) for x in subtree if x.id in org.boundaries},
        "locations": {x.id: {"lat": x.location.lat, "lon": x.location.lon} for x in subtree if x.location},
        "timezone": ctx.rulebook.timezone,
    }
    return Response(orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"})


@router.get("/v1/map")
async def scope_map(ctx: Ctx, p: Actor, area: Annotated[str | None, Query(max_length=64)] = None) -> Response:
    """The map of an area in the caller's scope (default: the scope itself): the areas under it with their names
    and levels, their GeoJSON ``boundaries`` and ``locations`` — what a grid worker's page needs to pick a report's
    place by tapping the grid map, and to find the grid a point lies in (grid workers, supervisors, admins)."""
    if p.role not in ("grid_worker", "supervisor", "admin"):
        raise NotAllowed(f"role {p.role} has no area to map (grid worker, supervisor or admin)")
    org = ctx.org
    a = area or (org.root.id if p.role == "admin" else p.scope_id)
    if a not in org.areas:
        raise Invalid(f"unknown area {a!r}", field="area")
    if not in_area(org, p, a):
        raise NotAllowed(f"area {a} is outside scope {p.scope}")
    subtree = org.subtree(a)
    body = {"area": {"id": a, "name": org.areas[a].name, "level": str(org.areas[a].level)},
            "areas": {x.id: {"name": x.name, "level": str(x.level), "parent": x.parent} for x in subtree},
            "boundaries": {x.id: mapping(org.boundaries[x.id]) for x in subtree if x.id in org.boundaries},
            "locations": {x.id: {"lat": x.location.lat, "lon": x.location.lon} for x in subtree if x.location}}
    return Response(orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"})


def _sse(event: str, data: dict[str, Any], seq: int) -> ServerSentEvent:
    return ServerSentEvent(data=orjson.dumps(data).decode(), event=event, id=str(seq), retry=3000)


async def _touched(ctx: AppContext, area: str, after: int) -> bool:
    """True when an issue or a visit under ``area`` changed after stream sequence ``after`` (rows carry their
    last seq)."""
    hit = await read_models(ctx).pool.fetchval(
        "SELECT 1 FROM issues WHERE areas @> ARRAY[$1]::text[] AND seq > $2 "
        "UNION ALL SELECT 1 FROM visits WHERE areas @> ARRAY[$1]::text[] AND seq > $2 LIMIT 1", area, after)
    return hit is not None


async def changes(ctx: AppContext, token: str, area: str, expires_at: float = float("inf"),
                  release: Callable[[], None] = lambda: None) -> AsyncIterator[ServerSentEvent]:
    """``hello`` now, then ``changed`` each time committed batches touched the area; ends on a bad token and
    when the token expires (``expired``). ``release`` runs however the stream ends."""
    try:
        async for sse in _changes(ctx, token, area, expires_at):
            yield sse
    finally:
        release()


async def _changes(ctx: AppContext, token: str, area: str, expires_at: float) -> AsyncIterator[ServerSentEvent]:
    worker = read_models(ctx).progress
    loop = asyncio.get_running_loop()
    seen = int(worker.seq)
    yield _sse("hello", {"seq": seen, "area": area}, seen)
    verified = loop.time()
    while True:
        left = expires_at - time.time()
        if left <= 0:
            yield _sse("expired", {"detail": "token expired"}, seen)
            return
        advanced = await worker.wait_for(seen + 1, min(WAIT_S, left + 0.01))
        if loop.time() - verified >= REVERIFY_S:
            try:
                ctx.verifier.verify(token)
            except TokenError as exc:
                yield _sse("expired", {"detail": str(exc)}, seen)
                return
            verified = loop.time()
        if not advanced:
            continue
        now = int(worker.seq)
        if await _touched(ctx, area, seen):
            yield _sse("changed", {"seq": now, "area": area}, now)
        seen = now
        await asyncio.sleep(MIN_GAP_S)


@router.get("/dashboard/stream")
async def dashboard_stream(request: Request, ctx: Ctx,
                           access_token: Annotated[str | None, Query(max_length=4096)] = None,
                           area: Annotated[str | None, Query(max_length=64)] = None) -> Response:
    """Live nudges for one area (EventSource: the token rides in ``access_token``)."""
    if not access_token:  # no token is 401 as everywhere else (was a 422 for the missing parameter)
        raise TokenError("missing access_token")
    p = ctx.verifier.verify(access_token)
    check_rate(ctx, p, write=False)
    a = supervisor_area(ctx, p, area)
    read_models(ctx)  # 503 before the stream starts where this process serves none
    slots = slots_of(request, ctx.settings.sse_max_per_subject)
    slots.take(p.subject)  # 429 beyond NEEDLE_SSE_MAX_PER_SUBJECT (with /v1/events/stream)
    return EventSourceResponse(changes(ctx, access_token, a, p.expires_at, lambda: slots.give(p.subject)),
                               ping=PING_S, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
