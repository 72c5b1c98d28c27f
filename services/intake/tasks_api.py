"""The task lifecycle: handlers acknowledge, return (退单) and resolve; grid workers verify
(核查) and record feedback (回访); grid workers and supervisors escalate (逐级反映) and urge."""
from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response

from services.media.references import check_references, evidence_rule
from services.router.routing import effective_urgency, next_department, serves
from shared.auth import Principal
from shared.commanding import execute
from shared.domain import commands as cmd
from shared.domain import ids
from shared.domain.errors import Conflict, Invalid, NotFound
from shared.domain.issue import IssueState, TaskState, decide
from shared.domain.levels import Level
from shared.domain.rules import escalation_level
from shared.events.models import Event

from .context import AppContext
from .issues_api import IfMatch, check_if_match, json_response, state_headers
from .schemas import (
    ExtensionRequestBody,
    FeedbackBody,
    ReasonBody,
    ReassignBody,
    ResolveBody,
    ReturnApproveBody,
    SuperviseBody,
    SuspendBody,
    UrgeBody,
    VerifyBody,
    issue_view,
    task_view,
)
from .security import (
    Actor,
    Ctx,
    require_area,
    require_overseer,
    require_owner_supervisor,
    require_role,
    require_task_holder,
)

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
    """退单: not this department's work. Without review (the rulebook's ``return.approval``) a lead's return
    moves the issue one level up; with it, the task awaits the command centre (``return_requested``)."""
    issue_id = ids.issue_of_task(task_id)

    def command(s: IssueState, now: datetime) -> cmd.Command:
        if ctx.rulebook.dispatch_for(s.category).return_approval:  # 退单审核: the command centre decides
            return cmd.RequestReturn(task_id=task_id, by=p.subject, reason=body.reason)
        return cmd.ReturnTask(task_id=task_id, by=p.subject, reason=body.reason)

    out = await _run(ctx, issue_id, p.subject, if_match, lambda s: require_task_holder(p, s.task(task_id)), command)
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
    def command(s: IssueState, now: datetime) -> cmd.Command:
        cap = ctx.rulebook.dispatch_for(s.category).extension
        return cmd.RequestExtension(task_id=task_id, by=p.subject, extension=body.extension, reason=body.reason,
                                    max=cap.max, max_count=cap.max_count)

    out = await _run(ctx, issue_id, p.subject, None, lambda s: require_task_holder(p, s.task(task_id)), command)
    return _task_response(out, task_id)


@router.post("/v1/tasks/{task_id}/extension/approve")
async def approve_extension(task_id: str, ctx: Ctx, p: Actor) -> Response:
    """批准延期: a supervisor over the issue's owner area moves the resolve due time by the requested amount
    (within the rulebook's ``extension`` cap)."""
    require_role(p, "supervisor")
    issue_id = ids.issue_of_task(task_id)

    def command(s: IssueState, now: datetime) -> cmd.Command:
        t = s.task(task_id)
        if t.extension_requested is None:
            raise Conflict(f"task {task_id} has no pending extension request", current_status=t.status)
        due, warn = ctx.clocks.extend(ctx.rulebook, t, t.extension_requested)
        return cmd.ApproveExtension(task_id=task_id, by=p.subject, resolve_due=due, resolve_warn=warn,
                                    max_count=ctx.rulebook.dispatch_for(s.category).extension.max_count)

    out = await _run(ctx, issue_id, p.subject, None, lambda s: require_owner_supervisor(ctx.org, p, s), command)
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
async def urge_issue(issue_id: str, ctx: Ctx, p: Actor, body: UrgeBody | None = None) -> Response:
    """催办: a supervisor urges whoever holds the issue, or the open ``task`` named (counted against its
    department)."""
    require_role(p, "supervisor")
    out = await _run(ctx, ids.check_issue_id(issue_id), p.subject, None,
                     lambda s: require_area(ctx.org, p, s.grid, f"issue {issue_id}"),
                     lambda s, now: cmd.UrgeIssue(by=p.subject, note=body.note if body else None,
                                                  task_id=body.task if body else None))
    return _issue_response(out)


# -- dispatch control (issue 19): 退单审核, 改派, 延期驳回, 缓办 ------------------------------------------------
def _overseer(ctx: AppContext, p: Principal) -> Callable[[IssueState], None]:
    """The check of a decision over a task: the owner area's command centre (the rulebook's fallback kind) or one
    above it, or a supervisor over the owner area."""
    return lambda s: require_overseer(ctx.org, p, s, ctx.rulebook.fallback)


def _new_task(ctx: AppContext, s: IssueState, old: TaskState, department: str, now: datetime) -> cmd.NewTask:
    """The task that takes ``old`` over at ``department``, with the clocks the rulebook's ``reassign`` says."""
    mode = ctx.rulebook.dispatch_for(s.category).reassign_clocks
    urgency = effective_urgency(ctx.rulebook, s.urgency, s.risk)
    d = ctx.clocks.reassigned(ctx.rulebook, s.category, urgency, old, now, mode)
    return cmd.NewTask(department=department, acknowledge_due=d.acknowledge_due, resolve_due=d.resolve_due,
                       acknowledge_warn=d.acknowledge_warn, resolve_warn=d.resolve_warn)


def _target(ctx: AppContext, s: IssueState, old: TaskState, department: str, field: str) -> str:
    """A named department that may take ``old`` over: it exists, serves the owner area, is not the holder."""
    area = s.owner_area or s.grid
    if department not in ctx.org.departments:
        raise Invalid(f"unknown department {department!r}", field=field)
    if not serves(ctx.org, department, area):
        raise Invalid(f"{department} does not serve the owner area {area}", field=field)
    if department == old.department:
        raise Invalid(f"task {old.id} is already with {department}", field=field)
    return department


@router.post("/v1/tasks/{task_id}/return/reject")
async def reject_return(task_id: str, body: ReasonBody, ctx: Ctx, p: Actor) -> Response:
    """退单驳回: the command centre (of the owner area or above) or a supervisor over it refuses the return; the
    task stays with the department."""
    out = await _run(ctx, ids.issue_of_task(task_id), p.subject, None, _overseer(ctx, p),
                     lambda s, now: cmd.RejectReturn(task_id=task_id, by=p.subject, reason=body.reason))
    return _task_response(out, task_id)


@router.post("/v1/tasks/{task_id}/return/approve")
async def approve_return(task_id: str, ctx: Ctx, p: Actor, body: ReturnApproveBody | None = None) -> Response:
    """退单同意: the task goes to ``reassign_to`` (改派), or to the rules' next department (never the returner);
    a lead's return escalates when nobody else at its level serves the owner area."""
    body = body or ReturnApproveBody()

    def command(s: IssueState, now: datetime) -> cmd.Command:
        t = s.task(task_id)
        if body.reassign_to is not None:
            to: str | None = _target(ctx, s, t, body.reassign_to, "reassign_to")
        elif t.role == "lead" and s.level is not None and s.owner_area is not None:
            holding = {x.department for x in s.open_tasks} | {t.department}
            to = next_department(ctx.org, ctx.rulebook, s.grid, s.category, Level(s.level), s.owner_area, holding)
        else:
            to = None  # a co-handler withdraws
        return cmd.ApproveReturn(task_id=task_id, by=p.subject, reason=body.reason,
                                 to=_new_task(ctx, s, t, to, now) if to else None)

    out = await _run(ctx, ids.issue_of_task(task_id), p.subject, None, _overseer(ctx, p),
                     command)
    return _task_response(out, task_id)


@router.post("/v1/tasks/{task_id}/reassign")
async def reassign_task(task_id: str, body: ReassignBody, ctx: Ctx, p: Actor) -> Response:
    """改派: a command centre or a supervisor over the owner area moves an open task to another department that
    serves the area; the old task is superseded (the reason on record) and the rulebook's ``reassign.clocks``
    says whether the clocks restart or continue."""
    def command(s: IssueState, now: datetime) -> cmd.Command:
        t = s.task(task_id)
        to = _target(ctx, s, t, body.department, "department")
        return cmd.ReassignTask(task_id=task_id, by=p.subject, reason=body.reason, to=_new_task(ctx, s, t, to, now),
                                clocks=ctx.rulebook.dispatch_for(s.category).reassign_clocks)

    out = await _run(ctx, ids.issue_of_task(task_id), p.subject, None, _overseer(ctx, p),
                     command)
    return _task_response(out, task_id)


@router.post("/v1/tasks/{task_id}/extension/reject")
async def reject_extension(task_id: str, body: ReasonBody, ctx: Ctx, p: Actor) -> Response:
    """延期驳回: a supervisor over the owner area refuses the requested extension."""
    out = await _run(ctx, ids.issue_of_task(task_id), p.subject, None,
                     lambda s: require_owner_supervisor(ctx.org, p, s),
                     lambda s, now: cmd.RejectExtension(task_id=task_id, by=p.subject, reason=body.reason))
    return _task_response(out, task_id)


@router.post("/v1/tasks/{task_id}/suspend")
async def request_suspension(task_id: str, body: SuspendBody, ctx: Ctx, p: Actor) -> Response:
    """缓办/挂账: the lead asks to pause its clocks until ``until`` (the review date), within the rulebook's
    ``suspension`` cap."""
    def command(s: IssueState, now: datetime) -> cmd.Command:
        cap = ctx.rulebook.dispatch_for(s.category).suspension
        return cmd.RequestSuspension(task_id=task_id, by=p.subject, reason=body.reason, until=body.until,
                                     max=cap.max, max_count=cap.max_count)

    out = await _run(ctx, ids.issue_of_task(task_id), p.subject, None,
                     lambda s: require_task_holder(p, s.task(task_id)), command)
    return _task_response(out, task_id)


@router.post("/v1/tasks/{task_id}/suspend/approve")
async def approve_suspension(task_id: str, ctx: Ctx, p: Actor) -> Response:
    """批准缓办: the command centre or a supervisor over the owner area pauses the task's clocks; a reminder
    fires at the review date."""
    def command(s: IssueState, now: datetime) -> cmd.Command:
        cap = ctx.rulebook.dispatch_for(s.category).suspension
        return cmd.ApproveSuspension(task_id=task_id, by=p.subject, max=cap.max, max_count=cap.max_count)

    out = await _run(ctx, ids.issue_of_task(task_id), p.subject, None, _overseer(ctx, p),
                     command)
    return _task_response(out, task_id)


@router.post("/v1/tasks/{task_id}/suspend/reject")
async def reject_suspension(task_id: str, body: ReasonBody, ctx: Ctx, p: Actor) -> Response:
    """驳回缓办: the clocks keep running."""
    out = await _run(ctx, ids.issue_of_task(task_id), p.subject, None, _overseer(ctx, p),
                     lambda s, now: cmd.RejectSuspension(task_id=task_id, by=p.subject, reason=body.reason))
    return _task_response(out, task_id)


@router.post("/v1/tasks/{task_id}/resume")
async def resume_task(task_id: str, ctx: Ctx, p: Actor) -> Response:
    """恢复: the suspended task's clocks run again with the time that was left when they paused. The lead's
    department, the command centre or a supervisor over the owner area."""
    def check(s: IssueState) -> None:
        t = s.task(task_id)
        if not (p.role == "handler" and p.scope_id == t.department):
            _overseer(ctx, p)(s)

    def command(s: IssueState, now: datetime) -> cmd.Command:
        t = s.task(task_id)
        if not t.suspended:
            raise Conflict(f"task {task_id} is not suspended", current_status=t.status)
        d = ctx.clocks.resume(ctx.rulebook, t, now)
        return cmd.ResumeTask(task_id=task_id, by=p.subject, acknowledge_due=d.acknowledge_due,
                              resolve_due=d.resolve_due, acknowledge_warn=d.acknowledge_warn,
                              resolve_warn=d.resolve_warn)

    out = await _run(ctx, ids.issue_of_task(task_id), p.subject, None, check, command)
    return _task_response(out, task_id)


@router.post("/v1/tasks/{task_id}/supervise")
async def supervise_task(task_id: str, body: SuperviseBody, ctx: Ctx, p: Actor) -> Response:
    """督办: a supervisor over the owner area or the command centre above puts an open task under supervision with
    its own ``due`` date; the router reminds every ``remind_every`` until the task is resolved."""
    out = await _run(ctx, ids.issue_of_task(task_id), p.subject, None, _overseer(ctx, p),
                     lambda s, now: cmd.SuperviseTask(task_id=task_id, by=p.subject, due=body.due, reason=body.reason,
                                                      remind_every=body.remind_every))
    return _task_response(out, task_id)
