"""The resident's own 回访: a one-time signed link (shared/domain/followup.py), a small mobile page at it, and
the answer it posts, recorded as ResidentFeedbackRecorded (the resident's voice; the grid worker's 回访 by phone
stays FeedbackRecorded).

- ``GET /v1/issues/{id}/followup`` (grid worker or supervisor over the issue, admin) -> ``{url, expires_at}``
- ``GET /f/{id}/{token}``: the page (no login); ``POST /f/{id}/{token}`` ``{solved, satisfaction, comment?}``.
  Once answered, or past ``expires_at``: 410; a link of another issue: 403."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Response

from shared import auth
from shared.commanding import execute, load_existing_state
from shared.domain import commands as cmd
from shared.domain import followup, ids
from shared.domain.errors import Conflict, Gone, NotAllowed, NotFound
from shared.domain.issue import IssueState, decide
from shared.events.models import Event
from shared.settings import Settings

from .context import AppContext
from .issues_api import json_response
from .schemas import ResidentFeedbackBody
from .security import Actor, Ctx, require_area

router = APIRouter(tags=["回访"])
PAGE = Path(__file__).resolve().parent / "static" / "followup.html"
SOURCE = "needle/followup"
RESIDENT = "resident"  # the actor of the resident's own answer (no token, no name)


def _csp(html: str) -> str:
    """Only the page's own inline script and style run (their hashes), it talks to itself only."""
    import base64
    import hashlib
    import re

    def h(tag: str) -> str:
        body = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        assert body is not None
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.group(1).encode()).digest()).decode() + "'"

    return (f"default-src 'none'; script-src {h('script')}; style-src {h('style')}; connect-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


PAGE_HTML = PAGE.read_text("utf-8")
PAGE_CSP = _csp(PAGE_HTML)


@cache
def _secret(data_dir: str) -> bytes:
    return auth.load_or_create_key(Path(data_dir), followup.SECRET_FILE)


def followup_secret(settings: Settings) -> bytes:
    """The HMAC key of the 回访 links (made on first use, 0600 in the data directory)."""
    return _secret(str(settings.data_dir))


def base_url(settings: Settings) -> str:
    return (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")


def resolved_at(state: IssueState) -> datetime | None:
    """When the issue was (last) resolved: its lead's resolution, or its closing when resolved on the spot."""
    times = [t.resolved_at for t in state.tasks if t.role == "lead" and t.resolved_at is not None]
    if times:
        return max(times)
    return state.closed_at if state.status == "closed" else None


def link(settings: Settings, state: IssueState) -> tuple[str, datetime]:
    """The issue's one link and its expiry; Conflict while the issue is not resolved."""
    at = resolved_at(state)
    if at is None or state.status not in ("resolved", "closed"):
        raise Conflict("the 回访 link exists once the issue is resolved", current_status=state.status)
    expires = followup.expiry(at, timedelta(seconds=settings.followup_ttl_s))
    tok = followup.token(followup_secret(settings), state.id, expires)
    return f"{base_url(settings)}/f/{state.id}/{tok}", expires


@router.get("/v1/issues/{issue_id}/followup")
async def get_followup(issue_id: str, ctx: Ctx, p: Actor) -> Response:
    """The resident's one-time 回访 link of a resolved issue (read it to them, or the notifier sends it)."""
    if p.role not in ("grid_worker", "supervisor", "admin"):
        raise NotAllowed(f"role {p.role} cannot ask the resident")
    ids.check_issue_id(issue_id)
    state, _ = await load_existing_state(ctx.store, issue_id)
    if not state.exists:
        raise NotFound(f"issue {issue_id} not found", field="id")
    require_area(ctx.org, p, state.grid, f"issue {issue_id}")
    if state.resident_feedback:
        raise Gone("the resident already answered")
    url, expires = link(ctx.settings, state)
    return json_response({"url": url, "expires_at": expires.isoformat().replace("+00:00", "Z"),
                          "used": False})


async def _checked(ctx: AppContext, issue_id: str, token: str) -> IssueState:
    try:
        ids.check_issue_id(issue_id)
    except Exception:
        raise NotAllowed("this link was not made for this issue") from None
    followup.check(followup_secret(ctx.settings), issue_id, token, datetime.now(UTC))
    state, _ = await load_existing_state(ctx.store, issue_id)
    if state.resident_feedback:
        raise Gone("thank you: this 回访 was already answered")
    return state


@router.get("/f/{issue_id}/{token}", include_in_schema=False)
async def followup_page(issue_id: str, token: str, ctx: Ctx) -> Response:
    """The resident's page (static, no login, no CDN)."""
    await _checked(ctx, issue_id, token)
    return Response(PAGE_HTML, media_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                             "Content-Security-Policy": PAGE_CSP, "X-Frame-Options": "DENY"})


@router.post("/f/{issue_id}/{token}", status_code=201)
async def post_followup(issue_id: str, token: str, body: ResidentFeedbackBody, ctx: Ctx) -> Response:
    """The resident's answer: recorded once as ``resident_feedback_recorded``; the link answers 410 after."""
    await _checked(ctx, issue_id, token)

    def decide_(state: IssueState, now: datetime) -> list[Event]:
        if not state.exists:
            raise NotFound(f"issue {issue_id} not found", field="id")
        if state.resident_feedback:
            raise Gone("thank you: this 回访 was already answered")
        return decide(state, cmd.RecordResidentFeedback(solved=body.solved, satisfaction=body.satisfaction,
                                                        comment=body.comment), now)

    await execute(ctx.store, issue_id, decide_, actor=RESIDENT, source=SOURCE)
    return json_response({"recorded": True}, 201)
