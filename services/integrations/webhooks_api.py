"""``/v1/webhooks``: integrators register signed webhooks, read their dead letters and replay them.

Who: integrator or admin. An integrator sees and manages the webhooks it registered (by token
subject); an admin sees all. Another owner's webhook is 404, as if it did not exist.
"""
from __future__ import annotations

import httpx
import structlog
from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from services.intake.context import AppContext
from services.intake.issues_api import json_response
from services.intake.security import Actor, Ctx, require_role
from shared.auth import Principal
from shared.domain.errors import Conflict, Invalid, NotFound, Unavailable
from shared.events import subjects as sj
from shared.events.models import BY_NAME

from .registry import Webhook
from .targets import AllowList, TargetRefused, resolve_checked
from .webhooks import WebhookService

router = APIRouter(tags=["webhooks"])
# webhook changes are no issue events: each is a line of the audit log, naming the caller
audit = structlog.get_logger("needle.audit")
URL_MAX = 2000


class WebhookBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=URL_MAX, description="http(s) URL that receives POSTed CloudEvents")
    types: list[str] = Field(min_length=1, max_length=64, description="event names, e.g. task_dispatched")
    area: str | None = Field(default=None, description="only issues whose grid lies under this area")
    secret: str = Field(min_length=16, max_length=200, description="HMAC-SHA256 key of Needle-Signature")


def _service(ctx: AppContext) -> WebhookService:
    if ctx.webhooks is None:
        raise Unavailable("webhooks are not running in this process")
    return ctx.webhooks


def validate_url(url: str) -> str:
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise Invalid("url is not a valid URL", field="url") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise Invalid("url must be an absolute http:// or https:// URL", field="url")
    return url


async def check_target(url: str, allow: AllowList) -> None:
    """422 when the URL's host is, or resolves to, an address that is not public and that the operator does not
    allow. A name that does not resolve yet is accepted (nothing to reach; every connect checks again)."""
    u = httpx.URL(url)
    try:
        await resolve_checked(u.host, u.port or (443 if u.scheme == "https" else 80), allow, must_resolve=False)
    except TargetRefused as exc:
        raise Invalid(f"url: {exc}", field="url") from None


def validate_types(types: list[str], area: str | None) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(t.strip() for t in types))
    for n in names:
        if n not in BY_NAME:
            raise Invalid(f"unknown event type {n!r} (known: {', '.join(BY_NAME)})", field="types")
    if area is not None and any(n in sj.NON_ISSUE_EVENTS for n in names):
        raise Invalid("rulebook and resident events belong to no area: drop `area` or rulebook_published and "
                      "resident_forgotten", field="types")
    return names


async def _owned(svc: WebhookService, p: Principal, hook_id: str) -> Webhook:
    # ids are ASCII ("wh" + hex); a non-ASCII letter is alnum too, but no valid NATS KV key (500, not 404)
    hook = await svc.registry.get(hook_id) if hook_id.isascii() and hook_id.isalnum() else None
    if hook is None or (p.role != "admin" and hook.owner != p.subject):
        raise NotFound(f"no webhook {hook_id!r}", field="id")
    return hook


@router.post("/v1/webhooks", status_code=201, summary="Register a webhook (integrator, admin)")
async def create_webhook(body: WebhookBody, ctx: Ctx, p: Actor) -> Response:
    """Events of the named types written after this call are POSTed to ``url`` as CloudEvents, signed with
    ``secret`` (header ``Needle-Signature``); see docs/WEBHOOKS.md. The secret is never shown again."""
    require_role(p, "integrator")
    url = validate_url(body.url)
    if body.area is not None and body.area not in ctx.org.areas:
        raise Invalid(f"unknown area {body.area!r}", field="area")
    types = validate_types(body.types, body.area)
    svc = _service(ctx)
    await check_target(url, AllowList.parse(svc.config.allow_private))
    owned = sum(1 for h in await svc.registry.all() if h.owner == p.subject)
    if owned >= svc.config.max_per_owner:
        raise Conflict(f"{p.subject} already has {owned} webhooks, the most one owner may have "
                       f"(NEEDLE_WEBHOOK_MAX_PER_OWNER); delete one first", field="url")
    hook = await svc.register(url=url, types=types, area=body.area, secret=body.secret, owner=p.subject)
    audit.info("webhook registered", actor=p.subject, webhook=hook.id, url=url, types=list(types), area=body.area)
    return json_response(hook.public(), 201, headers={"Location": f"/v1/webhooks/{hook.id}"})


@router.get("/v1/webhooks", summary="The caller's webhooks (admin: all)")
async def list_webhooks(ctx: Ctx, p: Actor) -> Response:
    require_role(p, "integrator")
    hooks = await _service(ctx).registry.all()
    return json_response([h.public() for h in hooks if p.role == "admin" or h.owner == p.subject])


@router.get("/v1/webhooks/{hook_id}", summary="One webhook, where its delivery stands, and counters")
async def get_webhook(hook_id: str, ctx: Ctx, p: Actor) -> Response:
    """``progress`` (from JetStream, the same through every intake worker): ``pending``,
    ``in_flight``, ``acknowledged_through_seq``. ``delivery``: counters of the delivering process since it
    started (``delivered``, ``failed_attempts``, ``parked``, ``filtered``); null when another process delivers."""
    require_role(p, "integrator")
    svc = _service(ctx)
    hook = await _owned(svc, p, hook_id)
    return json_response(hook.public() | {"progress": await svc.progress(hook.id), "delivery": svc.counters(hook.id)})


@router.delete("/v1/webhooks/{hook_id}", status_code=204, summary="Stop and forget a webhook")
async def delete_webhook(hook_id: str, ctx: Ctx, p: Actor) -> Response:
    require_role(p, "integrator")
    svc = _service(ctx)
    hook = await _owned(svc, p, hook_id)
    await svc.remove(hook)
    audit.info("webhook deleted", actor=p.subject, webhook=hook.id, owner=hook.owner)
    return Response(status_code=204)


@router.get("/v1/webhooks/{hook_id}/dead-letters", summary="Events parked after every delivery attempt failed")
async def dead_letters(hook_id: str, ctx: Ctx, p: Actor) -> Response:
    require_role(p, "integrator")
    svc = _service(ctx)
    hook = await _owned(svc, p, hook_id)
    letters = await svc.registry.dead_letters(hook.id)
    return json_response([{"seq": d.seq, "event_id": d.event_id, "type": d.type, "subject": d.subject,
                   "attempts": d.attempts, "status": d.status, "error": d.error, "parked_at": d.parked_at}
                  for d in letters])


@router.post("/v1/webhooks/{hook_id}/dead-letters/replay", summary="Deliver the parked events again")
async def replay(hook_id: str, ctx: Ctx, p: Actor) -> Response:
    """One attempt per parked event, oldest first (one issue's events in order, stopping at its first
    failure); delivered ones leave the list. Returns ``{replayed, still_failing}``."""
    require_role(p, "integrator")
    svc = _service(ctx)
    hook = await _owned(svc, p, hook_id)
    result = await svc.replay(hook)
    audit.info("webhook dead letters replayed", actor=p.subject, webhook=hook.id, replayed=result.replayed,
               still_failing=result.still_failing)
    return json_response({"replayed": result.replayed, "still_failing": result.still_failing})
