"""Who may do what: the bearer token dependency and the scope rules of DESIGN.md."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, Request

from shared.auth import Principal, TokenError
from shared.config import OrgTree
from shared.config.rulebook import Rulebook
from shared.domain.errors import NotAllowed, RateLimited
from shared.domain.issue import IssueState, TaskState
from shared.domain.levels import Level
from shared.ratelimit import retry_after

from .context import AppContext


def ctx_of(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


# async on purpose: FastAPI runs sync dependencies in its thread pool, a hop per request
async def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


async def get_principal(request: Request) -> Principal:
    header = request.headers.get("authorization")
    if not header:
        raise TokenError("missing bearer token")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise TokenError("Authorization must be 'Bearer <token>'")
    ctx: AppContext = request.app.state.ctx
    p = ctx.verifier.verify(token.strip())
    check_rate(ctx, p, write=request.method not in SAFE_METHODS)
    return p


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def check_rate(ctx: AppContext, p: Principal, *, write: bool) -> None:
    """The token subject's bucket for reads or writes; 429 with Retry-After when it is empty."""
    wait = ctx.limiter.check(p.subject, write=write, now=time.monotonic())
    if wait > 0:
        kind = "writes" if write else "reads"
        rate = ctx.limiter.writes if write else ctx.limiter.reads
        raise RateLimited(f"too many {kind} for this token (limit {rate.per_s:g}/s, burst {rate.burst:g}); "
                          f"retry in {wait:.1f} s", retry_after=retry_after(wait))


Ctx = Annotated[AppContext, Depends(get_ctx)]
Actor = Annotated[Principal, Depends(get_principal)]


def require_role(p: Principal, *roles: str) -> None:
    if p.role not in roles and p.role != "admin":
        raise NotAllowed(f"role {p.role} may not do this (needs {' or '.join(roles)})")


def in_area(org: OrgTree, p: Principal, area_id: str) -> bool:
    """True when ``area_id`` lies under the principal's ``area:`` scope (a reporter's too)."""
    if p.role == "admin":
        return True
    if p.scope_kind != "area":
        return False
    try:
        return org.is_under(area_id, p.scope_id)
    except KeyError:
        return False


def require_area(org: OrgTree, p: Principal, area_id: str, what: str = "this area") -> None:
    if not in_area(org, p, area_id):
        raise NotAllowed(f"{p.role} scope {p.scope or '-'} does not cover {what}")


# Who files what (docs/SECURITY.md): staff file anything in their area; a public app's reporter key files
# ordinary reports, which a grid worker checks and lifts (逐级反映) when needed
FILERS = ("grid_worker", "reporter", "admin")
REPORTER_URGENCIES = ("normal", "urgent")
REPORTER_RISK_CEILING = Level.street  # a reporter's risk flag may lift an issue this high, not higher


def require_filing(org: OrgTree, rulebook: Rulebook, p: Principal, grid: str, urgency: str,
                   risk: Sequence[str]) -> None:
    """May ``p`` file a report in ``grid`` with this urgency and these (known) risk flags? Pure. Grid workers:
    in their area, anything. Reporters (public apps): any grid (or under their ``area:`` scope), urgency
    normal or urgent, and only risk flags that lift the issue no higher than the street. Admins: anything.
    Integrators, handlers and supervisors file nothing here (supervisors file campaigns)."""
    if p.role not in FILERS:
        raise NotAllowed(f"role {p.role} may not file reports (needs {', '.join(FILERS)})")
    if p.role == "admin":
        return
    if p.role == "grid_worker" or p.scope:
        require_area(org, p, grid, f"grid {grid}")
    if p.role != "reporter":
        return
    if urgency not in REPORTER_URGENCIES:
        raise NotAllowed(f"a reporter key may file urgency {' or '.join(REPORTER_URGENCIES)}, not {urgency}; "
                         f"the grid worker raises it")
    for flag in risk:
        rule = rulebook.risk.get(flag)
        if rule is not None and rule.level.rank > REPORTER_RISK_CEILING.rank:
            raise NotAllowed(f"a reporter key may not set risk flag {flag} (it lifts the issue to the {rule.level}); "
                             f"the grid worker sets it")


def can_read(org: OrgTree, p: Principal, state: IssueState) -> bool:
    if p.role in ("admin", "integrator"):
        return True
    if p.role in ("grid_worker", "supervisor"):
        return in_area(org, p, state.grid)
    if p.role == "handler":  # while its department holds a task: not once it is returned or superseded
        return any(t.department == p.scope_id and t.status not in HANDED_BACK for t in state.tasks)
    return False


HANDED_BACK = frozenset({"returned", "superseded"})  # a task that no longer gives its department the issue


def require_read(org: OrgTree, p: Principal, state: IssueState) -> None:
    if not can_read(org, p, state):
        raise NotAllowed(f"issue {state.id} is outside {p.role} scope {p.scope or '-'}")


def command_center_of(ctx: AppContext, state: IssueState) -> str | None:
    """The department id of the command centre that triages the issue (受理): the ``command_center`` serving
    its owner area (once routed, the router's; before, the area at the category's start level above the
    grid)."""
    owner = state.owner_area
    if owner is None:
        category = ctx.rulebook.categories.get(state.category)
        if category is None or state.grid not in ctx.org.areas:
            return None
        owner = ctx.org.owner_at(state.grid, category.start).id
    dept = ctx.org.serving(owner, ctx.rulebook.fallback)
    return dept.id if dept else None


def is_command_center(ctx: AppContext, p: Principal, state: IssueState) -> bool:
    return p.role == "handler" and p.scope_id is not None and p.scope_id == command_center_of(ctx, state)


def may_read_issue(ctx: AppContext, p: Principal, state: IssueState) -> bool:
    """Who reads an issue, its events and its photos: :func:`can_read`, or the command centre that triages it
    (受理) and decides on its tasks (退单审核, 改派), whether or not a task of its own is on it."""
    return can_read(ctx.org, p, state) or is_command_center(ctx, p, state)


def require_task_holder(p: Principal, task: TaskState) -> None:
    if p.role == "admin":
        return
    if p.role != "handler" or p.scope_id != task.department:
        raise NotAllowed(f"task {task.id} belongs to {task.department}, not to {p.scope or p.role}")


def is_command_center_over(org: OrgTree, p: Principal, area_id: str, center_kind: str) -> bool:
    """A handler of a command centre (指挥中心: the rulebook's fallback kind, ``center_kind``) whose area is
    ``area_id`` or above it."""
    if p.role != "handler" or p.scope_kind != "dept":
        return False
    dept = org.departments.get(p.scope_id)
    return dept is not None and dept.kind == center_kind and org.is_under(area_id, dept.area)


def require_owner_supervisor(org: OrgTree, p: Principal, state: IssueState) -> None:
    """A supervisor whose scope covers the issue's owner area (not just its grid): a city-level task is
    overseen from the city."""
    require_role(p, "supervisor")
    area = state.owner_area or state.grid
    if not in_area(org, p, area):
        raise NotAllowed(f"{p.role} scope {p.scope or '-'} does not cover the owner area {area} of issue {state.id}")


def require_overseer(org: OrgTree, p: Principal, state: IssueState, center_kind: str) -> None:
    """退单审核, 改派, 缓办: the command centre (``center_kind``) of the owner area or above it, or a supervisor over
    the owner area."""
    area = state.owner_area or state.grid
    if p.role == "admin" or is_command_center_over(org, p, area, center_kind):
        return
    if p.role == "supervisor" and in_area(org, p, area):
        return
    raise NotAllowed(f"{p.role} scope {p.scope or '-'} is neither a command centre nor a supervisor over the "
                     f"owner area {area} of issue {state.id}")
