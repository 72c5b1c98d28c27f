"""References from a write (a report, a resolve, a verification) to stored media."""
from __future__ import annotations

from typing import Any

from services.intake.context import AppContext
from shared.domain.errors import Invalid, Unavailable
from shared.domain.evidence import rule_name
from shared.events.models import MediaRef

from .store import MediaStore


def media_store(ctx: AppContext) -> MediaStore:
    store = ctx.media
    if store is None:
        raise Unavailable("the media store is not available in this process")
    return store


async def check_references(ctx: AppContext, media: list[Any], issue_id: str) -> tuple[MediaRef, ...]:
    """The references of a write, each to a stored medium (else 422 naming ``media.<i>.id``), indexed under
    ``issue_id`` before the write's event is appended."""
    if not media:
        return ()
    store = media_store(ctx)
    refs = tuple(MediaRef(id=m.id, phase=m.phase) for m in media)
    for i, ref in enumerate(refs):
        if await store.info(ref.id) is None:
            raise Invalid(f"medium {ref.id} is not stored: upload it first (POST /v1/media)", field=f"media.{i}.id")
    await store.reference([r.id for r in refs], issue_id)
    return refs


def evidence_rule(ctx: AppContext, category: str, stage: str) -> str | None:
    """The name of the rulebook's evidence rule for ``stage`` (report | resolve) of ``category``, when the
    rulebook in force has one (shared/domain/evidence.py applies it)."""
    c = ctx.rulebook.categories.get(category)
    if c is None or getattr(c.evidence, stage) is None:
        return None
    return rule_name(category, stage)
