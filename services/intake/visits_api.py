"""组团式服务: a grid's service team records its household visits (走访).

``POST /v1/visits`` appends one ``visit_recorded`` event on ``needle.events.visit.<id>.visit_recorded``, the
first (and only) event of the visit: the id comes from the Idempotency-Key (hashed with the caller) as an
issue's does, and the append meets an expected last subject sequence of 0, so a retry never records a second
visit (``append_first``). The household key is replaced by its HMAC under a secret kept in the data directory
(``secrets/household.key``, beside the token key) before anything is decided or stored.

Who may record: a grid worker whose scope covers the grid, or a handler of the grid's service team (a
department of kind ``grid_team`` attached to the grid).
"""
from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Response
from pydantic import Field, field_validator

from shared import auth, entropy
from shared.auth import Principal
from shared.commanding import append_first, load_existing_state, utcnow
from shared.domain import ids, rules
from shared.domain import visits as dv
from shared.domain.errors import Conflict, Invalid, NotAllowed, NotFound, Unavailable
from shared.domain.levels import Level
from shared.events import subjects as sj
from shared.events.codec import Envelope
from shared.events.models import VisitRecorded

from . import problems
from .context import AppContext
from .issues_api import SOURCE, json_response
from .schemas import NO_NUL, Strict
from .security import Actor, Ctx, in_area

router = APIRouter(tags=["visits"])
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]
MAX_ISSUES = 20
TEAM_KIND = "grid_team"


class VisitBody(Strict):
    grid: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    household: str = Field(min_length=1, max_length=100, pattern=NO_NUL,
                           description="the household's key in the grid's own register (door or household "
                                       "number); needle keeps only a keyed hash of it")
    kind: Literal["routine", "campaign", "follow_up"] = "routine"
    campaign: str | None = Field(default=None, min_length=1, max_length=40, pattern=r"^[0-9a-z]+$")
    visited_at: datetime | None = Field(default=None, description="when the visit took place (default: now)")
    note: str | None = Field(default=None, max_length=2000, pattern=NO_NUL,
                             description="free text; no personal data (names, phones, ids) belongs here")
    issues: list[str] = Field(default_factory=list, max_length=MAX_ISSUES,
                              description="issues already reported that the visit raised")

    @field_validator("visited_at")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is None:
            return None
        if v.tzinfo is None:
            raise ValueError("visited_at needs a UTC offset (e.g. 2026-03-02T09:30:00+08:00)")
        try:
            return v.astimezone(UTC)
        except OverflowError:
            raise ValueError("visited_at is out of range") from None


@cache
def _secret(data_dir: str) -> bytes:
    return auth.load_or_create_key(Path(data_dir), dv.SECRET_FILE)


def household_secret(ctx: AppContext) -> bytes:
    """The HMAC secret of household keys (made on first use, 0600 in the data directory)."""
    return _secret(str(ctx.settings.data_dir))


def team_grid(ctx: AppContext, p: Principal) -> str | None:
    """The grid whose service team (a department of kind ``grid_team`` attached to a grid) the handler is of."""
    dept = ctx.org.departments.get(p.scope_id) if p.role == "handler" else None
    if dept is None or dept.kind != TEAM_KIND or ctx.org.areas[dept.area].level != Level.grid:
        return None
    return dept.area


def grid_people(ctx: AppContext, p: Principal, grid: str) -> bool:
    """The grid's own people: a grid worker over it, a handler of its service team (admins too)."""
    if p.role == "grid_worker":
        return in_area(ctx.org, p, grid)
    if p.role == "handler":
        return team_grid(ctx, p) == grid
    return p.role == "admin"


def check_grid(ctx: AppContext, grid: str, field: str = "grid") -> None:
    rules.check_grid(ctx.org, grid, field)


async def load_visit(ctx: AppContext, visit_id: str) -> Envelope | None:
    if not (1 <= len(visit_id) <= 40) or not sj.valid_token(visit_id):
        return None
    env = await ctx.store.load_one(sj.visit_event(visit_id))
    return env if env is not None and isinstance(env.data, VisitRecorded) else None


async def check_report_visit(ctx: AppContext, visit_id: str, grid: str) -> None:
    """A report naming the visit it came from: the visit exists and is of the report's grid."""
    env = await load_visit(ctx, visit_id)
    if env is None:
        raise Invalid(f"unknown visit {visit_id!r}", field="visit")
    assert isinstance(env.data, VisitRecorded)
    if env.data.grid != grid:
        raise Invalid(f"visit {visit_id} was at grid {env.data.grid}, not {grid}", field="visit")


async def _check_issues(ctx: AppContext, grid: str, issue_ids: list[str]) -> None:
    for i, issue_id in enumerate(issue_ids):
        try:
            state, _ = await load_existing_state(ctx.store, ids.check_issue_id(issue_id))
        except NotFound:
            state = None
        if state is None or not state.exists:
            raise Invalid(f"unknown issue {issue_id!r}", field=f"issues.{i}")
        if state.grid != grid:
            raise Invalid(f"issue {issue_id} is at grid {state.grid}, not {grid}", field=f"issues.{i}")


async def _check_campaign(ctx: AppContext, cid: str, grid: str) -> None:
    state, _ = await load_existing_state(ctx.store, ids.idempotent_issue_id(cid, grid))
    if not state.exists or state.campaign != cid:
        raise Invalid(f"campaign {cid} has no issue at grid {grid}", field="campaign")


def visit_view(env: Envelope) -> dict[str, Any]:
    v = env.data
    assert isinstance(v, VisitRecorded)
    return {"id": env.subject, "grid": v.grid, "kind": v.kind, "campaign": v.campaign,
            "visited_at": v.visited_at.isoformat().replace("+00:00", "Z"), "by": v.by, "note": v.note,
            "issues": list(v.issues), "household": v.household, "sequence": env.seq}


@router.post("/v1/visits", status_code=201,
             responses={409: problems.problem_response("Idempotency-Key reused with another body")})
async def record_visit(body: VisitBody, ctx: Ctx, p: Actor, idempotency_key: IdempotencyKey = None) -> Response:
    """Record a household visit (grid worker of the grid, or a handler of the grid's service team). The
    household leaves only as an HMAC; a replay of the same Idempotency-Key returns the same visit."""
    if p.role not in ("grid_worker", "handler", "admin"):
        raise NotAllowed(f"role {p.role} may not record visits (needs grid_worker or the grid's team)")
    check_grid(ctx, body.grid)
    if not grid_people(ctx, p, body.grid):
        raise NotAllowed(f"{p.role} scope {p.scope or '-'} is neither over grid {body.grid} nor its service team")
    secret = household_secret(ctx)
    digest = dv.household_digest(secret, body.grid, body.household)
    dump = body.model_dump(mode="json") | {"household": digest}
    rhash = dv.request_hash(secret, dump) if idempotency_key is not None else None
    if body.campaign is not None:
        await _check_campaign(ctx, body.campaign, body.grid)
    await _check_issues(ctx, body.grid, list(dict.fromkeys(body.issues)))
    vid = dv.visit_id(p.subject, idempotency_key, int(time.time() * 1000), entropy.randbits(80))
    now = utcnow()
    command = dv.RecordVisit(grid=body.grid, household=digest, kind=body.kind, by=p.subject,
                             visited_at=body.visited_at, campaign=body.campaign, note=body.note,
                             issues=tuple(dict.fromkeys(body.issues)), request_hash=rhash)
    events = dv.decide_visit(False, command, now)
    res = await append_first(ctx.store, vid, list(events), now=now, actor=p.subject, msg_id=f"visit:{vid}",
                             source=SOURCE)
    if res is not None:
        return json_response(visit_view(res.envelopes[0]), 201,
                             {"Location": f"/v1/visits/{vid}", "Needle-Seq": str(res.seq)})
    if idempotency_key is None:
        raise Unavailable("visit id collision; retry")
    env = await load_visit(ctx, vid)
    if env is None:
        raise Unavailable("visit being recorded concurrently; retry")
    assert isinstance(env.data, VisitRecorded)
    if env.data.request_hash != rhash:
        raise Conflict("Idempotency-Key was already used with a different request body", field="Idempotency-Key")
    return json_response(visit_view(env), 201, {"Location": f"/v1/visits/{vid}", "Needle-Seq": str(env.seq),
                                                "Idempotent-Replayed": "true"})
