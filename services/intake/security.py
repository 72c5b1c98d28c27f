"""Who may do what: the bearer token dependency and the scope rules of DESIGN.md."""
from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from shared.auth import Principal, TokenError
from shared.config import OrgTree
from shared.domain.errors import NotAllowed, RateLimited
from shared.domain.issue import IssueState, TaskState
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
    """True when ``area_id`` lies under the principal's ``area:`` scope."""
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


def can_read(org: OrgTree, p: Principal, state: IssueState) -> bool:
    if p.role in ("admin", "integrator"):
        return True
    if p.role in ("grid_worker", "supervisor"):
        return in_area(org, p, state.grid)
    if p.role == "handler":
        return any(t.department == p.scope_id for t in state.tasks)
    return False


def require_read(org: OrgTree, p: Principal, state: IssueState) -> None:
    if not can_read(org, p, state):
        raise NotAllowed(f"issue {state.id} is outside {p.role} scope {p.scope or '-'}")


def require_task_holder(p: Principal, task: TaskState) -> None:
    if p.role == "admin":
        return
    if p.role != "handler" or p.scope_id != task.department:
        raise NotAllowed(f"task {task.id} belongs to {task.department}, not to {p.scope or p.role}")


COMMAND_CENTER = "command_center"


def is_command_center_over(org: OrgTree, p: Principal, area_id: str) -> bool:
    """A handler of a command centre whose area is ``area_id`` or above it (指挥中心)."""
    if p.role != "handler" or p.scope_kind != "dept":
        return False
    dept = org.departments.get(p.scope_id)
    return dept is not None and dept.kind == COMMAND_CENTER and org.is_under(area_id, dept.area)


def require_owner_supervisor(org: OrgTree, p: Principal, state: IssueState) -> None:
    """A supervisor whose scope covers the issue's owner area (not just its grid): a city-level task is
    overseen from the city."""
    require_role(p, "supervisor")
    area = state.owner_area or state.grid
    if not in_area(org, p, area):
        raise NotAllowed(f"{p.role} scope {p.scope or '-'} does not cover the owner area {area} of issue {state.id}")


def require_overseer(org: OrgTree, p: Principal, state: IssueState) -> None:
    """退单审核, 改派, 缓办: the command centre of the owner area or above it, or a supervisor over the owner area."""
    area = state.owner_area or state.grid
    if p.role == "admin" or is_command_center_over(org, p, area):
        return
    if p.role == "supervisor" and in_area(org, p, area):
        return
    raise NotAllowed(f"{p.role} scope {p.scope or '-'} is neither a command centre nor a supervisor over the "
                     f"owner area {area} of issue {state.id}")
