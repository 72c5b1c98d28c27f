"""Moderation of what anonymous readers see (FixMyStreet's model, docs/OPEN311.md "Reading requests"): a supervisor
over the issue's grid, or an admin, approves (``public: true``) or withdraws (``public: false``) the publication of
the issue's description in anonymous Open311 reads. One event per change
(``description_publication_changed``); asking for the state the issue is already in records nothing and answers
the issue as it is (200, ``Idempotent-Replayed: true``), as the triage decisions do. The reason is never published.
"""
from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response

from shared.auth import Principal
from shared.commanding import execute
from shared.config import OrgTree
from shared.domain import commands as cmd
from shared.domain import ids
from shared.domain.errors import NotFound
from shared.domain.issue import IssueState, decide
from shared.events.models import Event

from .issues_api import IfMatch, check_if_match, json_response, state_headers
from .schemas import PublicationBody, issue_view
from .security import Actor, Ctx, require_area, require_role

router = APIRouter(tags=["issues"])
SOURCE = "needle/intake"


def require_moderator(org: OrgTree, p: Principal, state: IssueState) -> None:
    """A supervisor whose area covers the issue's grid, or an admin (403 otherwise)."""
    require_role(p, "supervisor")
    require_area(org, p, state.grid, f"issue {state.id}")


@router.post("/v1/issues/{issue_id}/publication")
async def set_publication(issue_id: str, body: PublicationBody, ctx: Ctx, p: Actor,
                          if_match: IfMatch = None) -> Response:
    """Publish (``public: true``) or withdraw (``false``) the issue's description in anonymous Open311 reads
    (a supervisor over the issue's grid, or an admin). Notes and reasons are never published."""
    issue_id = ids.check_issue_id(issue_id)

    def decide_(state: IssueState, now: datetime) -> list[Event]:
        if not state.exists:
            raise NotFound(f"issue {issue_id} not found", field="id")
        require_moderator(ctx.org, p, state)
        check_if_match(if_match, state)
        return decide(state, cmd.SetDescriptionPublication(by=p.subject, public=body.public, reason=body.reason),
                      now)

    out = await execute(ctx.store, issue_id, decide_, actor=p.subject, source=SOURCE)
    headers = state_headers(out.state, out.seq)
    if not out.envelopes:  # already so: nothing new recorded
        headers["Idempotent-Replayed"] = "true"
    return json_response(issue_view(out.state), headers=headers)
