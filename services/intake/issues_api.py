"""Grid workers' routes: report an issue, read it back, resolve it on site."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Response

from services.media.references import check_references, evidence_rule
from shared import entropy
from shared.auth import Principal
from shared.commanding import append_first, execute, load_current_state, load_existing_state, utcnow
from shared.domain import commands as cmd
from shared.domain import ids
from shared.domain.errors import ConcurrencyConflict, Conflict, Invalid, NotFound, PreconditionFailed, Unavailable
from shared.domain.issue import IssueState, decide, initial_state
from shared.domain.rules import check_category, check_grid, check_risk_flags
from shared.events.models import Event
from shared.privacy.residents import Sealed, resident_view, reveal_events, seal_resident

from . import problems
from .context import AppContext
from .schemas import Created, ReportIssueBody, ResolveBody, issue_view
from .security import Actor, Ctx, may_read_issue, require_area, require_read, require_role

router = APIRouter(tags=["issues"])
SOURCE = "needle/intake"

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]
IfMatch = Annotated[str | None, Header(alias="If-Match")]


def etag(version: int) -> str:
    return f'"{version}"'


def check_if_match(if_match: str | None, state: IssueState) -> None:
    if if_match is None or if_match.strip() == "*":
        return
    wanted = {v.strip().removeprefix("W/") for v in if_match.split(",")}
    if etag(state.version) not in wanted:
        raise PreconditionFailed(f"issue {state.id} is at version {state.version}, not {if_match}",
                                 field="If-Match", current_version=state.version)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # /v1 timestamps are RFC 3339 in UTC with "Z" (Open311 keeps its own form, as its spec wants)
    return Response(orjson.dumps(body, option=orjson.OPT_UTC_Z), status_code=status, media_type="application/json",
                    headers=headers)


def state_headers(state: IssueState, seq: int) -> dict[str, str]:
    return {"ETag": etag(state.version), "Needle-Seq": str(seq), "Location": f"/v1/issues/{state.id}"}


def place_report(ctx: AppContext, body: ReportIssueBody) -> ReportIssueBody:
    """The report with its grid: as named, or the grid whose boundary holds ``location`` (point-in-polygon,
    shared/config/boundaries.py). A named grid with a boundary and a point farther outside it than the org's
    ``boundary_tolerance_m`` is 422 naming ``location``."""
    index = ctx.org.grid_index
    where = body.location
    if body.grid is None:
        if where is None:
            raise Invalid("a report names its grid, or gives a location inside one", field="grid")
        if not index:
            raise Invalid("this org's grids have no boundaries: name the grid", field="grid")
        grid = index.locate(where.lat, where.lon)
        if grid is None:
            raise Invalid(f"location {where.lat:g},{where.lon:g} is outside every grid of the org", field="location")
        return body.model_copy(update={"grid": grid})
    if where is not None:
        away = index.distance_m(body.grid, where.lat, where.lon)
        if away is not None and away > index.tolerance_m:
            raise Invalid(f"location {where.lat:g},{where.lon:g} is {away:.0f} m outside grid {body.grid!r} "
                          f"(tolerance {index.tolerance_m:g} m)", field="location", grid=body.grid,
                          located=index.locate(where.lat, where.lon))
    return body


def validate_report(ctx: AppContext, body: ReportIssueBody) -> ReportIssueBody:
    """The report, placed in its grid (:func:`place_report`) and checked against the org and the rulebook."""
    body = place_report(ctx, body)
    assert body.grid is not None
    check_grid(ctx.org, body.grid)
    check_category(ctx.rulebook, body.category)
    check_risk_flags(ctx.rulebook, body.risk)
    if body.note is not None and not body.resolved_on_site:
        raise Invalid("note is what was done on the spot: send it with resolved_on_site", field="note")
    return body


NEWER_FIELDS = ("visit", "media", "resolved_on_site", "note", "media_url", "description_public")


def request_hash(body: ReportIssueBody, resident_fingerprint: str | None = None) -> str:
    """What an Idempotency-Key replay must match. The resident enters only as an HMAC under their own
    key: a plain hash of a phone number could be brute-forced out of the (immutable) event."""
    dump = body.model_dump(mode="json")
    for name in NEWER_FIELDS:  # left out at their defaults: a key's hash is what it was before they existed
        if dump.get(name) in (None, False, []):
            dump.pop(name, None)
    if body.resident is not None:
        dump["resident"] = {"id": body.resident.id, "fingerprint": resident_fingerprint}
    return hashlib.sha256(orjson.dumps(dump, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def seal_report_resident(ctx: AppContext, body: ReportIssueBody) -> Sealed | None:
    if body.resident is None:
        return None
    if ctx.residents is None:
        raise Unavailable("residents' keys are not available in this process")
    r = body.resident
    return await seal_resident(ctx.residents, resident_id=r.id, name=r.name, phone=r.phone)


@router.post("/v1/issues", status_code=201, response_model=Created,
             responses={409: problems.problem_response("Idempotency-Key reused with another body")})
async def report_issue(body: ReportIssueBody, ctx: Ctx, p: Actor, idempotency_key: IdempotencyKey = None) -> Response:
    """Report a resident's issue (grid worker). A replay of the same Idempotency-Key returns the same issue."""
    require_role(p, "grid_worker")
    body = validate_report(ctx, body)
    assert body.grid is not None
    require_area(ctx.org, p, body.grid, f"grid {body.grid}")
    outcome = await record_report(ctx, p, body, idempotency_key, SOURCE)
    if not outcome.replayed:
        return json_response({"id": outcome.issue_id, "status": "reported", "version": 1}, 201,
                             {"ETag": etag(1), "Needle-Seq": str(outcome.seq),
                              "Location": f"/v1/issues/{outcome.issue_id}"})
    state = outcome.state
    assert state is not None
    return json_response({"id": state.id, "status": state.status, "version": state.version}, 201,
                         state_headers(state, state.last_seq) | {"Idempotent-Replayed": "true"})


@dataclass(frozen=True, slots=True)
class ReportOutcome:
    issue_id: str
    seq: int
    replayed: bool  # the Idempotency-Key was seen before with the same body: the existing issue
    state: IssueState | None = None  # the current state, for a replay


async def record_report(ctx: AppContext, p: Principal, body: ReportIssueBody, key: str | None,
                        source: str) -> ReportOutcome:
    """The report use case, for every entry point (``POST /v1/issues``, Open311): a new issue, or the
    one this reporter's Idempotency-Key already created (same body), or 409 (another body). ``body`` is
    placed and validated (:func:`validate_report`)."""
    assert body.grid is not None
    if body.visit is not None:
        from .visits_api import check_report_visit

        await check_report_visit(ctx, body.visit, body.grid)
    sealed = await seal_report_resident(ctx, body)
    # what a replay of the key must match; without a key nothing is ever compared with it
    rhash = request_hash(body, sealed.fingerprint if sealed else None) if key is not None else None
    if key is not None:
        issue_id = ids.idempotent_issue_id(p.subject, ids.check_idempotency_key(key))
    elif ctx.store.texts is not None:  # an id whose data key is stored already: the append waits for no key
        issue_id = await ctx.store.texts.reserve(new_report_id)
    else:
        issue_id = new_report_id()
    media = await check_references(ctx, body.media, issue_id)
    command = cmd.ReportIssue(grid=body.grid, category=body.category, title=body.title,
                              description=body.description, urgency=body.urgency, risk=tuple(body.risk),
                              location=body.location, reporter=p.subject, request_hash=rhash,
                              resident=sealed.ref if sealed else None, visit=body.visit, media=media,
                              media_url=body.media_url,
                              resolved_on_site=body.resolved_on_site, note=body.note,
                              review=ctx.rulebook.category(body.category).intake == "review",
                              review_within=ctx.rulebook.category(body.category).sla.review,
                              warn_at=ctx.rulebook.warn_at,
                              report_rule=evidence_rule(ctx, body.category, "report"),
                              resolve_rule=evidence_rule(ctx, body.category, "resolve"),
                              description_public=body.description_public)
    now = utcnow()
    events: list[Event] = decide(initial_state(issue_id), command, now)
    res = await append_first(ctx.store, issue_id, events, now=now, actor=p.subject, msg_id=f"report:{issue_id}",
                             source=source)
    if res is not None:
        return ReportOutcome(issue_id, res.seq, replayed=False)
    if key is None:  # a random id collided: astronomically unlikely
        raise ConcurrencyConflict("issue id collision; retry")
    # the key was used before: same body -> the same issue, another body -> 409
    state, _ = await load_current_state(ctx.store, issue_id)
    if not state.exists:
        raise ConcurrencyConflict("issue being created concurrently; retry")
    if state.request_hash != rhash:
        raise Conflict("Idempotency-Key was already used with a different request body", field="Idempotency-Key")
    return ReportOutcome(issue_id, state.last_seq, replayed=True, state=state)


def new_report_id() -> str:
    return ids.new_issue_id(int(time.time() * 1000), entropy.randbits(80))


async def _readable(ctx: AppContext, p: Any, issue_id: str) -> tuple[IssueState, list[Any]]:
    state, envs = await load_existing_state(ctx.store, ids.check_issue_id(issue_id))
    if not state.exists:
        raise NotFound(f"issue {issue_id} not found", field="id")
    if not may_read_issue(ctx, p, state):
        require_read(ctx.org, p, state)  # raises, naming the scope
    return state, envs


async def readable_issue(ctx: AppContext, p: Any, issue_id: str) -> IssueState:
    """The issue, if the caller may read it (404 / 403 otherwise)."""
    state, _ = await _readable(ctx, p, issue_id)
    return state


async def similar_count(ctx: AppContext, state: IssueState) -> int | None:
    """How many open issues are similar to this one (合并办理); None where no read models are served here."""
    if ctx.read_models is None or state.location is None or state.category not in ctx.rulebook.categories:
        return None
    from services.projections.similar import find_similar

    return len(await find_similar(ctx.read_models.pool, state, ctx.rulebook.similar_for(state.category)))


@router.get("/v1/issues/{issue_id}")
async def get_issue(issue_id: str, ctx: Ctx, p: Actor) -> Response:
    """The issue as of every write that returned 2xx (folded from the stream, not a read model); ``similar``:
    how many open issues look like duplicates of it (from the read models; see ``/similar``)."""
    state, _ = await _readable(ctx, p, issue_id)
    resident = await resident_view(ctx.residents, state.resident, p.role)
    view = issue_view(state, resident, ctx.org)
    view["similar"] = await similar_count(ctx, state)
    return json_response(view, headers=state_headers(state, state.last_seq))


@router.get("/v1/issues/{issue_id}/events")
async def get_issue_events(issue_id: str, ctx: Ctx, p: Actor) -> Response:
    """The issue's events as CloudEvents 1.0, oldest first."""
    state, envs = await _readable(ctx, p, issue_id)
    return json_response(await reveal_events(ctx.residents, envs, p.role), headers=state_headers(state, state.last_seq))


@router.post("/v1/issues/{issue_id}/resolve-on-site")
async def resolve_on_site(issue_id: str, ctx: Ctx, p: Actor, body: ResolveBody | None = None,
                          if_match: IfMatch = None) -> Response:
    """Closed at the grid by the grid worker: no dispatch. With the after-photo where the category requires
    one (the report's photos count)."""
    require_role(p, "grid_worker")
    note = body.note if body else None
    media = await check_references(ctx, body.media if body else [], ids.check_issue_id(issue_id))

    def decide_(state: IssueState, now: Any) -> list[Event]:
        if not state.exists:
            raise NotFound(f"issue {issue_id} not found", field="id")
        require_area(ctx.org, p, state.grid, f"issue {issue_id}")
        check_if_match(if_match, state)
        rule = evidence_rule(ctx, state.category, "resolve")
        return decide(state, cmd.ResolveOnSite(by=p.subject, note=note, media=media, resolve_rule=rule), now)

    out = await execute(ctx.store, ids.check_issue_id(issue_id), decide_, actor=p.subject, source=SOURCE)
    return json_response(issue_view(out.state), headers=state_headers(out.state, out.seq))
