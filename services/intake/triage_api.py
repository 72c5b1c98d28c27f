"""受理 at the command centre: accept (dispatch by the rules), reject (不予受理), void (作废) and recategorise (改类)
a report while no task has been acknowledged, each with a reason and one event.

Who: a handler of the ``command_center`` serving the issue's owner area (the area at the category's start
level above the grid, once routed the one the router chose), a supervisor over the issue's grid, or an
admin. Retrying a decision already recorded records nothing and answers the issue as it is (200); once a
task has been acknowledged every decision is 409.
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from fastapi import APIRouter, Response

from shared.auth import Principal
from shared.commanding import execute
from shared.domain import commands as cmd
from shared.domain import ids
from shared.domain.errors import Invalid, NotAllowed, NotFound
from shared.domain.issue import IssueState, decide
from shared.domain.levels import Level
from shared.events.models import Event

from .context import AppContext
from .issues_api import IfMatch, check_if_match, json_response, state_headers
from .schemas import AcceptBody, ReasonBody, RecategoriseBody, issue_view
from .security import Actor, Ctx, in_area, is_command_center

router = APIRouter(tags=["triage"])
SOURCE = "needle/intake"


def require_triager(ctx: AppContext, p: Principal, state: IssueState) -> None:
    if p.role == "admin" or (p.role == "supervisor" and in_area(ctx.org, p, state.grid)):
        return
    if is_command_center(ctx, p, state):
        return
    raise NotAllowed(f"{p.role} scope {p.scope or '-'} may not triage issue {state.id} (its command centre or a "
                     "supervisor over its grid may)")


async def _triage(ctx: AppContext, p: Principal, issue_id: str, if_match: str | None,
                  command: Callable[[IssueState], cmd.Command]) -> Response:
    issue_id = ids.check_issue_id(issue_id)

    def decide_(state: IssueState, now: datetime) -> list[Event]:
        if not state.exists:
            raise NotFound(f"issue {issue_id} not found", field="id")
        require_triager(ctx, p, state)
        check_if_match(if_match, state)
        return decide(state, command(state), now)

    out = await execute(ctx.store, issue_id, decide_, actor=p.subject, source=SOURCE)
    headers = state_headers(out.state, out.seq)
    if not out.envelopes:  # the decision was already recorded (a retry): nothing new
        headers["Idempotent-Replayed"] = "true"
    return json_response(issue_view(out.state), headers=headers)


@router.post("/v1/issues/{issue_id}/accept")
async def accept_issue(issue_id: str, ctx: Ctx, p: Actor, body: AcceptBody | None = None,
                       if_match: IfMatch = None) -> Response:
    """受理: a report waiting for review is dispatched by the rules (nothing to do for one never held)."""
    return await _triage(ctx, p, issue_id, if_match,
                         lambda s: cmd.AcceptIssue(by=p.subject, reason=body.reason if body else None))


@router.post("/v1/issues/{issue_id}/reject")
async def reject_issue(issue_id: str, body: ReasonBody, ctx: Ctx, p: Actor, if_match: IfMatch = None) -> Response:
    """不予受理: not government business, out of jurisdiction...; the grid worker sees the reason."""
    return await _triage(ctx, p, issue_id, if_match, lambda s: cmd.RejectIssue(by=p.subject, reason=body.reason))


@router.post("/v1/issues/{issue_id}/void")
async def void_issue(issue_id: str, body: ReasonBody, ctx: Ctx, p: Actor, if_match: IfMatch = None) -> Response:
    """作废: a mistake or a test."""
    return await _triage(ctx, p, issue_id, if_match, lambda s: cmd.VoidIssue(by=p.subject, reason=body.reason))


@router.post("/v1/issues/{issue_id}/recategorise")
async def recategorise_issue(issue_id: str, body: RecategoriseBody, ctx: Ctx, p: Actor,
                             if_match: IfMatch = None) -> Response:
    """改类: another category and/or grid; open tasks are superseded and the issue is routed anew."""
    if body.category is None and body.grid is None:
        raise Invalid("name the new category, the new grid, or both", field="category")
    if body.category is not None and body.category not in ctx.rulebook.categories:
        raise Invalid(f"unknown category {body.category!r}", field="category")
    if body.grid is not None:
        area = ctx.org.areas.get(body.grid)
        if area is None or area.level != Level.grid:
            raise Invalid(f"{body.grid!r} is not a grid", field="grid")

    def command(s: IssueState) -> cmd.Command:
        grid = body.grid or s.grid
        if p.role == "supervisor" and not in_area(ctx.org, p, grid):
            raise NotAllowed(f"supervisor scope {p.scope} does not cover grid {grid}")
        return cmd.RecategoriseIssue(by=p.subject, reason=body.reason, category=body.category or s.category,
                                     grid=grid)

    return await _triage(ctx, p, issue_id, if_match, command)
