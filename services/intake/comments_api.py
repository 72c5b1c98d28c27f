"""Comments on an issue (issue 19): every participant in scope talks on the issue — the grid worker, the lead
and co-handlers, the command centres and supervisors above. A lead's ``progress`` report is its 阶段性答复.
Comments are events of the issue (so they are in its history, SSE and webhooks); the list is read from them."""
from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Response
from pydantic import Field

from shared.auth import Principal
from shared.commanding import execute, load_current_state
from shared.config import OrgTree
from shared.domain import commands as cmd
from shared.domain import ids
from shared.domain.errors import NotAllowed, NotFound
from shared.domain.issue import IssueState, decide
from shared.events.models import CommentAdded, Event

from .issues_api import json_response, state_headers
from .schemas import NO_NUL, Strict, _ts
from .security import Actor, Ctx, can_read, in_area, is_command_center_over

router = APIRouter(tags=["comments"])
SOURCE = "needle/intake"


class CommentBody(Strict):
    text: str = Field(min_length=1, max_length=5000, pattern=NO_NUL, description="no personal data here")
    kind: Literal["comment", "progress", "info_request", "info_reply"] = "comment"
    media: list[str] = Field(default_factory=list, max_length=10,
                             description="references (URLs or ids) to photos or files already stored")
    task_id: str | None = Field(default=None, min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_-]+$")


def participant(org: OrgTree, p: Principal, state: IssueState, center_kind: str) -> bool:
    """The grid worker of the grid, a department with a task on the issue, a command centre over the owner area,
    a supervisor over the grid, an admin."""
    if p.role == "admin":
        return True
    if p.role in ("grid_worker", "supervisor"):
        return in_area(org, p, state.grid)
    if p.role == "handler":
        return (any(t.department == p.scope_id for t in state.tasks)
                or is_command_center_over(org, p, state.owner_area or state.grid, center_kind))
    return False


def _check(org: OrgTree, p: Principal, state: IssueState, center_kind: str, *, write: bool) -> None:
    if not state.exists:
        raise NotFound(f"issue {state.id} not found", field="id")
    if participant(org, p, state, center_kind) or (not write and can_read(org, p, state)):
        return
    raise NotAllowed(f"{p.role} scope {p.scope or '-'} takes no part in issue {state.id}")


@router.post("/v1/issues/{issue_id}/comments", status_code=201)
async def add_comment(issue_id: str, body: CommentBody, ctx: Ctx, p: Actor) -> Response:
    """Add a comment (``kind``: comment, progress — the lead's 阶段性答复 —, info_request, info_reply). With the
    rulebook's ``info_request: {pauses: true}``, an info request from the lead's department holds the lead task's
    clocks (clocks_paused) until the grid worker's info reply resumes them with the time that was left
    (clocks_resumed)."""
    issue_id = ids.check_issue_id(issue_id)
    department = p.scope_id if p.role == "handler" else None

    def decide_(state: IssueState, now: datetime) -> list[Event]:
        _check(ctx.org, p, state, ctx.rulebook.fallback, write=True)
        pauses = resume = None
        if body.kind == "info_request":
            pauses = ctx.rulebook.dispatch_for(state.category).info_request_pauses
        lead = state.lead
        if body.kind == "info_reply" and lead is not None and lead.info_paused_at is not None:
            d = ctx.clocks.resume(ctx.rulebook, lead, now, since=lead.info_paused_at)
            resume = cmd.MovedClocks(task_id=lead.id, acknowledge_due=d.acknowledge_due, resolve_due=d.resolve_due,
                                     acknowledge_warn=d.acknowledge_warn, resolve_warn=d.resolve_warn)
        return decide(state, cmd.AddComment(by=p.subject, role=p.role, text=body.text, kind=body.kind,
                                            department=department, task_id=body.task_id,
                                            media=tuple(body.media), pauses=bool(pauses), resume=resume), now)

    out = await execute(ctx.store, issue_id, decide_, actor=p.subject, source=SOURCE)
    env = out.envelopes[0]
    assert isinstance(env.data, CommentAdded)
    return json_response(_view(env.seq, env.data), 201, state_headers(out.state, out.seq))


@router.get("/v1/issues/{issue_id}/comments")
async def list_comments(issue_id: str, ctx: Ctx, p: Actor) -> Response:
    """The issue's comments, oldest first."""
    state, envs = await load_current_state(ctx.store, ids.check_issue_id(issue_id))
    _check(ctx.org, p, state, ctx.rulebook.fallback, write=False)
    items = [_view(e.seq, e.data) for e in envs if isinstance(e.data, CommentAdded)]
    return json_response({"items": items})


def _view(seq: int, c: CommentAdded) -> dict[str, object]:
    return {"seq": seq, "at": _ts(c.at), "by": c.by, "role": c.role, "department": c.department, "kind": c.kind,
            "text": c.text, "task_id": c.task_id, "media": list(c.media)}
