"""Top-down campaigns (自上而下的排查任务, e.g. the 2008 infant census): one issue per grid under an area,
each routed by the router like any reported issue, and their completion tracked.

* The campaign id comes from the request's ``Idempotency-Key`` (hashed with the caller, so two supervisors'
  keys never meet) or is random. Each grid's issue id is ``idempotent_issue_id(campaign, grid)``: the first
  event on a new subject must meet ``expected_last_seq=0``, so a retried (or half-failed) creation never
  duplicates an issue and completes the missing ones.
* There is no campaign record: ``GET /v1/campaigns/{id}?area=`` recomputes the issue ids from the org tree
  (grids under the area) and folds each issue from the stream.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Header, Query, Response
from pydantic import Field

from shared import entropy
from shared.commanding import append_first, load_current_state, load_existing_state, utcnow
from shared.domain import commands as cmd
from shared.domain import ids
from shared.domain.errors import ConcurrencyConflict, Conflict, Invalid, NotFound, Unavailable
from shared.domain.issue import IssueState, decide, initial_state
from shared.domain.levels import Level

from . import problems
from .context import AppContext
from .issues_api import json_response
from .schemas import LINE, TEXT, Strict
from .security import Actor, Ctx, require_area, require_role

router = APIRouter(tags=["campaigns"])
SOURCE = "needle/intake"
CONCURRENCY = 32
_ID_CHARS = frozenset("0123456789abcdefghjkmnpqrstvwxyz")

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]


class CampaignBody(Strict):
    area: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    category: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    title: str = Field(min_length=1, max_length=200, pattern=LINE)
    description: str | None = Field(default=None, max_length=5000, pattern=TEXT)
    households: dict[str, Annotated[int, Field(ge=0, le=1_000_000)]] | Literal["all"] | None = Field(
        default=None, description="households the campaign's visits must reach: per grid ({grid: n}, grids "
                                  "left out have no target), or \"all\" (every household the org declares)")


def household_targets(ctx: AppContext, body: CampaignBody, grids: list[str]) -> dict[str, int]:
    """grid -> households to reach (only the grids with a target)."""
    if body.households is None:
        return {}
    if body.households == "all":
        out = {g: n for g in grids if (n := ctx.org.areas[g].households) is not None}
        if not out:
            raise Invalid(f"no grid under {body.area} declares its households", field="households")
        return out
    inside = set(grids)
    for g in body.households:
        if g not in inside:
            raise Invalid(f"{g!r} is not a grid under {body.area}", field=f"households.{g}")
    return dict(body.households)


def campaign_id(subject: str, idempotency_key: str | None) -> str:
    """``c`` + 25 base32 characters: a hash of the caller and its key, or random."""
    if idempotency_key is not None:
        key = ids.check_idempotency_key(idempotency_key)
        return "c" + ids.idempotent_issue_id(subject, f"campaign\x00{key}")[1:]
    return "c" + ids.new_issue_id(int(time.time() * 1000), entropy.randbits(80))[1:]


def check_campaign_id(value: str) -> str:
    if not (1 <= len(value) <= 40) or any(c not in _ID_CHARS for c in value):
        raise NotFound(f"campaign {value} not found", field="id")
    return value


def _grids(ctx: AppContext, area_id: str) -> list[str]:
    try:
        ctx.org.area(area_id)
    except KeyError:
        raise Invalid(f"unknown area {area_id!r}", field="area") from None
    grids = [a.id for a in ctx.org.grids_under(area_id)]
    if not grids:
        raise Invalid(f"area {area_id!r} has no grids", field="area")
    return grids


def _request_hash(body: CampaignBody) -> str:
    dump = body.model_dump(mode="json")
    if dump.get("households") is None:  # as before households existed: a retry of an older campaign still matches
        dump.pop("households", None)
    return hashlib.sha256(orjson.dumps(dump, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def _report_one(ctx: AppContext, sem: asyncio.Semaphore, cid: str, grid: str, body: CampaignBody,
                      rhash: str, subject: str, target: int | None = None) -> tuple[bool, int]:
    """Report the campaign's issue at ``grid`` (with the households it must reach); (created now?, stream seq)."""
    issue_id = ids.idempotent_issue_id(cid, grid)
    command = cmd.ReportIssue(grid=grid, category=body.category, title=body.title, description=body.description,
                              reporter=subject, request_hash=rhash, campaign=cid, households_target=target)
    async with sem:
        now = utcnow()
        events = decide(initial_state(issue_id), command, now)
        res = await append_first(ctx.store, issue_id, events, now=now, actor=subject, msg_id=f"report:{issue_id}",
                                 source=SOURCE)
        if res is not None:
            return True, res.seq
        state, _ = await load_current_state(ctx.store, issue_id)  # the key's issue, as the leader has it
    if not state.exists:
        raise ConcurrencyConflict("campaign being created concurrently; retry")
    if state.campaign != cid or state.request_hash != rhash:
        raise Conflict("Idempotency-Key was already used with a different campaign", field="Idempotency-Key")
    return False, state.last_seq


@router.post("/v1/campaigns", status_code=202,
             responses={409: problems.problem_response("Idempotency-Key reused with another body")})
async def create_campaign(body: CampaignBody, ctx: Ctx, p: Actor, idempotency_key: IdempotencyKey = None
                          ) -> Response:
    """Launch a campaign (supervisor over the area): one issue per grid, routed by the category's rules.
    A retry with the same Idempotency-Key returns the same campaign and creates no duplicate."""
    require_role(p, "supervisor")
    grids = _grids(ctx, body.area)
    if body.category not in ctx.rulebook.categories:
        raise Invalid(f"unknown category {body.category!r}", field="category")
    require_area(ctx.org, p, body.area, f"area {body.area}")
    targets = household_targets(ctx, body, grids)
    cid = campaign_id(p.subject, idempotency_key)
    rhash = _request_hash(body)
    sem = asyncio.Semaphore(CONCURRENCY)
    results = await asyncio.gather(*(_report_one(ctx, sem, cid, g, body, rhash, p.subject, targets.get(g))
                                     for g in grids))
    created = sum(1 for new, _ in results if new)
    headers = {"Location": f"/v1/campaigns/{cid}?area={body.area}", "Needle-Seq": str(max(s for _, s in results))}
    if idempotency_key is not None and created == 0:
        headers["Idempotent-Replayed"] = "true"
    out: dict[str, Any] = {"id": cid, "area": body.area, "category": body.category, "issues": len(grids),
                           "created": created}
    if targets:
        out["households_target"] = sum(targets.values())
    return json_response(out, 202, headers)


def _item(s: IssueState) -> dict[str, Any]:
    lead = s.lead
    return {"id": s.id, "grid": s.grid, "status": s.status, "level": s.level,
            "lead": lead.department if lead else None, "lead_status": lead.status if lead else None}


@router.get("/v1/campaigns/{cid}")
async def get_campaign(cid: str, ctx: Ctx, p: Actor,
                       area: Annotated[str, Query(min_length=1, max_length=64)]) -> Response:
    """Completion of a campaign over ``area`` (or a part of it): status counts, done (closed), percent."""
    require_role(p, "supervisor")
    check_campaign_id(cid)
    grids = _grids(ctx, area)
    require_area(ctx.org, p, area, f"area {area}")
    sem = asyncio.Semaphore(CONCURRENCY)

    async def load(grid: str) -> IssueState:
        async with sem:
            state, _ = await load_existing_state(ctx.store, ids.idempotent_issue_id(cid, grid))
            return state

    states = [s for s in await asyncio.gather(*(load(g) for g in grids)) if s.exists and s.campaign == cid]
    if not states:
        raise NotFound(f"campaign {cid} has no issue under area {area}", field="id")
    counts = Counter(s.status for s in states)
    done = counts.get("closed", 0)
    levels = Counter(s.level or "unrouted" for s in states)
    households = await _reach(ctx, cid, states)
    return json_response({
        "id": cid, "area": area, "category": states[0].category, "title": states[0].title,
        "issues": len(states), "done": done, "percent": round(100.0 * done / len(states), 1),
        "status": dict(sorted(counts.items())),
        "levels": {lv: levels[lv] for lv in [*(x.value for x in Level), "unrouted"] if lv in levels},
        "items": [_item(s) for s in states],
        "households": households,
    })


async def _reach(ctx: AppContext, cid: str, states: list[IssueState]) -> dict[str, Any] | None:
    """Households reached by the campaign's visits ÷ its target, per grid and in total, and the grids that lag
    (below target, furthest behind first); None for a campaign without household targets."""
    targets = {s.grid: s.households_target for s in states if s.households_target is not None}
    if not targets:
        return None
    if ctx.read_models is None:
        raise Unavailable("read models are not running in this process (household reach comes from them)")
    from services.projections.queries import campaign_reach

    reached = await campaign_reach(ctx.read_models.pool, cid, sorted(targets))
    grids: list[dict[str, Any]] = [{"grid": g, "target": t, "reached": reached.get(g, 0),
              "rate": round(min(reached.get(g, 0), t) / t, 4) if t else 1.0} for g, t in sorted(targets.items())]
    target, got = sum(targets.values()), sum(min(x["reached"], x["target"]) for x in grids)
    lagging = sorted((x for x in grids if x["reached"] < x["target"]), key=lambda x: (x["rate"], x["grid"]))
    return {"target": target, "reached": got, "rate": round(got / target, 4) if target else 1.0,
            "grids": grids, "lagging": [x["grid"] for x in lagging]}
