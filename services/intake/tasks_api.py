"""The task lifecycle: handlers acknowledge, return (退单) and resolve; grid workers verify
(核查) and record feedback (回访); grid workers and supervisors escalate (逐级反映) and urge."""
from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response

from services.media.references import check_references, evidence_rule
from shared.commanding import execute
from shared.domain import commands as cmd
from shared.domain import ids
from shared.domain.errors import Conflict, NotFound
from shared.domain.issue import IssueState, decide
from shared.domain.levels import Level
from shared.domain.rules import escalation_level
from shared.events.models import Event

from .context import AppContext
from .issues_api import IfMatch, check_if_match, json_response, state_headers
from .schemas import (
    ExtensionRequestBody,
    FeedbackBody,
    NoteBody,
    ReasonBody,
    ResolveBody,
    VerifyBody,
    issue_view,
    task_view,
)
from .security import Actor, Ctx, require_area, require_role, require_task_holder

router = APIRouter(tags=["tasks"])
SOURCE = "needle/intake"


async def _run(ctx: AppContext, issue_id: str, actor: str, if_match: str | None,
               check: Callable[[IssueState], None], command: Callable[[IssueState, datetime], cmd.Command]) -> Any:
    def decide_(state: IssueState, now: datetime) -> list[Event]:
        if not state.exists:
            raise NotFound(f"issue {issue_id} not found", field="id")
        check(state)
        check_if_match(if_match, state)
        return decide(state, command(state, now), now)

    return await execute(ctx.store, issue_id, decide_, actor=actor, source=SOURCE)


def _task_response(out: Any, task_id: str) -> Response:
    return json_response(task_view(out.state.task(task_id)) | {"issue": issue_view(out.state)},
                         headers=state_headers(out.state, out.seq))


def _issue_response(out: Any) -> Response:
    return json_response(issue_view(out.state), headers=state_headers(out.state, out.seq))


@router.post("/v1/tasks/{task_id}/acknowledge")
async def acknowledge_task(task_id: str, ctx: Ctx, p: Actor, if_match: IfMatch = None) -> Response:
    """签收: the handler's department takes the task; stops the acknowledge clock."""
    issue_id = ids.issue_of_task(task_id)
    out = await _run(ctx, issue_id, p.subject, if_match, lambda s: require_task_holder(p, s.task(task_id)),
                     lambda s, now: cmd.AcknowledgeTask(task_id=task_id, by=p.subject))
    return _task_response(out, task_id)


@router.post("/v1/tasks/{task_id}/return")
async def return_task(task_id: str, body: ReasonBody, ctx: Ctx, p: Actor, if_match: IfMatch = None) -> Response:
    """退单: not this department's work. A lead's return moves the issue one level up."""
    issue_id = ids.issue_of_task(task_id)
    out = await _run(ctx, issue_id, p.subject, if_match, lambda s: require_task_holder(p, s.task(task_id)),
                     lambda s, now: cmd.ReturnTask(task_id=task_id, by=p.subject, reason=body.reason))
    return _task_response(out, task_id)


@router.post("/v1/tasks/{task_id}/resolve")
async def resolve_task(task_id: str, ctx: Ctx, p: Actor, body: ResolveBody | None = None,
                       if_match: IfMatch = None) -> Response:
    """处理反馈: the department reports the work done (with the after-photo where the category requires
    one); the grid worker verifies it next."""
    issue_id = ids.issue_of_task(task_id)
    media = await check_references(ctx, body.media if body else [], issue_id)
    out = await _run(ctx, issue_id, p.subject, if_match, lambda s: require_task_holder(p, s.task(task_id)),
                     lambda s, now: cmd.ResolveTask(task_id=task_id, by=p.subject, note=body.note if body else None,
                                                    media=media,
                                                    resolve_rule=evidence_rule(ctx, s.category, "resolve")))
    return _task_response(out, task_id)


@router.post("/v1/tasks/{task_id}/extension")
async def request_extension(task_id: str, body: ExtensionRequestBody, ctx: Ctx, p: Actor) -> Response:
    """申请延期: the handler asks for more time; a supervisor approves it."""
    issue_id = ids.issue_of_task(task_id)
    out = await _run(ctx, issue_id, p.subject, None, lambda s: require_task_holder(p, s.task(task_id)),
                     lambda s, now: cmd.RequestExtension(task_id=task_id, by=p.subject, extension=body.extension,
                                                         reason=body.reason))
    return _task_response(out, task_id)


@router.post("/v1/tasks/{task_id}/extension/approve")
async def approve_extension(task_id: str, ctx: Ctx, p: Actor) -> Response:
    """批准延期: a supervisor over the issue's area moves the resolve due time by the requested amount."""
    require_role(p, "supervisor")
    issue_id = ids.issue_of_task(task_id)

    def command(s: IssueState, now: datetime) -> cmd.Command:
        t = s.task(task_id)
        if t.extension_requested is None:
            raise Conflict(f"task {task_id} has no pending extension request", current_status=t.status)
        due, warn = ctx.clocks.extend(ctx.rulebook, t, t.extension_requested)
        return cmd.ApproveExtension(task_id=task_id, by=p.subject, resolve_due=due, resolve_warn=warn)

    out = await _run(ctx, issue_id, p.subject, None, lambda s: require_area(ctx.org, p, s.grid, f"issue {issue_id}"),
                     command)
    return _task_response(out, task_id)


@router.post("/v1/issues/{issue_id}/verify")
async def verify_issue(issue_id: str, body: VerifyBody, ctx: Ctx, p: Actor, if_match: IfMatch = None) -> Response:
    """核查: the grid worker checks the fix. Passed closes the issue; failed reopens it (返工)."""
    require_role(p, "grid_worker")
    media = await check_references(ctx, body.media, ids.check_issue_id(issue_id))
    out = await _run(ctx, ids.check_issue_id(issue_id), p.subject, if_match,
                     lambda s: require_area(ctx.org, p, s.grid, f"issue {issue_id}"),
                     lambda s, now: cmd.VerifyIssue(passed=body.passed, by=p.subject, note=body.note, media=media))
    return _issue_response(out)


@router.post("/v1/issues/{issue_id}/feedback")
async def record_feedback(issue_id: str, body: FeedbackBody, ctx: Ctx, p: Actor) -> Response:
    """回访: the resident's satisfaction."""
    require_role(p, "grid_worker")
    out = await _run(ctx, ids.check_issue_id(issue_id), p.subject, None,
                     lambda s: require_area(ctx.org, p, s.grid, f"issue {issue_id}"),
                     lambda s, now: cmd.RecordFeedback(satisfaction=body.satisfaction, by=p.subject, note=body.note))
    return _issue_response(out)


@router.post("/v1/issues/{issue_id}/escalate", status_code=202)
async def escalate_issue(issue_id: str, body: ReasonBody, ctx: Ctx, p: Actor, if_match: IfMatch = None) -> Response:
    """逐级反映: one level up (never past the city); the router dispatches the upper level."""
    require_role(p, "grid_worker", "supervisor")

    def command(s: IssueState, now: datetime) -> cmd.Command:
        up = escalation_level(ctx.org, s.grid, Level(s.level)) if s.level is not None else None
        return cmd.EscalateIssue(by=p.subject, reason=body.reason, to_level=up.value if up else None)

    out = await _run(ctx, ids.check_issue_id(issue_id), p.subject, if_match,
                     lambda s: require_area(ctx.org, p, s.grid, f"issue {issue_id}"), command)
    return json_response(issue_view(out.state), 202, state_headers(out.state, out.seq))


@router.post("/v1/issues/{issue_id}/urge")
async def urge_issue(issue_id: str, ctx: Ctx, p: Actor, body: NoteBody | None = None) -> Response:
    """催办: a supervisor urges whoever holds the issue."""
    require_role(p, "supervisor")
    out = await _run(ctx, ids.check_issue_id(issue_id), p.subject, None,
                     lambda s: require_area(ctx.org, p, s.grid, f"issue {issue_id}"),
                     lambda s, now: cmd.UrgeIssue(by=p.subject, note=body.note if body else None))
    return _issue_response(out)


