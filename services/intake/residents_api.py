"""个人信息删除: forget a resident (crypto-shredding). The recorded facts stay; the resident's sealed
name and phone become unreadable everywhere."""
from __future__ import annotations

from fastapi import APIRouter, Response

from shared.commanding import utcnow
from shared.domain.errors import Invalid, Unavailable
from shared.privacy.residents import forget

from .security import Actor, Ctx, require_role

router = APIRouter(tags=["residents"])


@router.delete("/v1/residents/{resident_id}", status_code=204, response_class=Response)
async def forget_resident(resident_id: str, ctx: Ctx, p: Actor) -> Response:
    """Destroy the resident's data key (admin). Records ``resident_forgotten`` (no personal data); every
    read shows the resident's name and phone as "[erased]" from then on. Idempotent: 204 every time."""
    require_role(p, "admin")
    nc = ctx.nc
    if ctx.residents is None or nc is None:
        raise Unavailable("residents' keys are not available in this process")
    try:
        await forget(nc, ctx.residents, resident_id, by=p.subject, now=utcnow())
    except ValueError as exc:
        raise Invalid(str(exc), field="resident_id") from None
    return Response(status_code=204)
