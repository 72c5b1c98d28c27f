"""``POST /v1/media`` (upload a photo) and ``GET /v1/media/{id}[?size=thumb]`` (read one back).

Upload: the raw body with its Content-Type (image/jpeg, image/png or image/webp), by any role that writes.
The body is streamed to a temporary file under the data directory while it is counted (over
``NEEDLE_MEDIA_MAX_BYTES``: 413, nothing stored), checked from its bytes (probe.py), then stored in the
Object Store. 201 ``{id, sha256, content_type, bytes, width, height}``; the id is the sha256 of the
stored bytes, so the same upload is the same medium (idempotent).

Read: only for a caller who may read an issue whose events reference the medium (admins: any).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from services.intake.context import AppContext
from services.intake.issues_api import json_response
from services.intake.security import Actor, Ctx, may_read_issue, require_role
from shared.auth import Principal
from shared.commanding import load_existing_state
from shared.domain.errors import NotAllowed, NotFound, TooLarge, UnsupportedMediaType

from . import probe
from .receive import FORM_OVERHEAD, sink_for
from .references import media_store

router = APIRouter(tags=["media"])
WRITERS = ("grid_worker", "handler", "supervisor")
MEDIA_ID = re.compile(r"^[0-9a-f]{64}$")
UPLOAD_PATH = "/v1/media"
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_FORM = {"schema": {"type": "object", "required": ["file"], "properties": {"file": {"type": "string",
                                                                                   "format": "binary"}}}}
UPLOAD_BODY = {"requestBody": {"required": True, "description": "the photo's bytes (JPEG, PNG or WebP), or a form "
                                                                "with the photo in the part named file",
                               "content": {**{t: _BINARY for t in probe.TYPES}, "multipart/form-data": _FORM}}}
MEDIA_SCHEMA = {"type": "object", "required": ["id", "sha256", "content_type", "bytes", "width", "height"],
                "properties": {"id": {"type": "string"}, "sha256": {"type": "string"},
                               "content_type": {"type": "string"}, "bytes": {"type": "integer"},
                               "width": {"type": "integer"}, "height": {"type": "integer"}}}


def _workdir(ctx: AppContext) -> Path:
    """Temporary files of uploads and reads: on the data directory's disk, not in memory."""
    workdir = ctx.settings.data_dir / "tmp"
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


@router.post(UPLOAD_PATH, status_code=201, openapi_extra=UPLOAD_BODY,
             responses={201: {"description": "the stored photo", "content": {"application/json": {
                 "schema": MEDIA_SCHEMA}}}})
async def upload_media(request: Request, ctx: Ctx, p: Actor) -> Response:
    """Upload a photo: the raw body with its Content-Type, or multipart/form-data with the photo in the part
    named ``file`` (with that part's Content-Type). The same bytes are the same medium."""
    require_role(p, *WRITERS)
    store = media_store(ctx)
    limit = ctx.settings.media_max_bytes
    length = request.headers.get("content-length")
    multipart = (request.headers.get("content-type") or "").lower().startswith("multipart/")
    room = limit + (FORM_OVERHEAD if multipart else 0)
    if length is not None and (not length.isdigit() or int(length) > room):
        raise TooLarge(f"a photo may have at most {limit} bytes", field="body", limit=limit)
    workdir = _workdir(ctx)
    fd, name = tempfile.mkstemp(dir=workdir, suffix=".upload")
    upload = Path(name)
    prepared: probe.Prepared | None = None
    try:
        with os.fdopen(fd, "wb") as out:
            sink = sink_for(request.headers.get("content-type"), out, limit)
            if not multipart and sink.declared not in probe.TYPES:
                raise UnsupportedMediaType(f"send the photo's bytes as {', '.join(probe.TYPES)}, or a "
                                           f"multipart/form-data form (got {sink.declared})",
                                           field="Content-Type", accepted=sorted(probe.TYPES))
            async for chunk in request.stream():
                sink.write(chunk)
            sink.finish()
        declared, head = sink.declared, sink.head
        content_type = probe.check_declared(declared, head)
        prepared = await asyncio.to_thread(
            probe.prepare, upload, content_type, strip_location=ctx.settings.media_exif_location == "strip",
            thumb_px=ctx.settings.media_thumb_px, workdir=workdir)
        info = await store.put(prepared)
    finally:
        with contextlib.suppress(OSError):
            upload.unlink()
        if prepared is not None and prepared.path != upload:
            with contextlib.suppress(OSError):
                prepared.path.unlink()
    return json_response(info.as_dict(), 201, {"Location": f"/v1/media/{info.id}"})


async def may_read(ctx: AppContext, p: Principal, media_id: str) -> bool:
    """An admin, or a reader of an issue whose own events reference the medium."""
    if p.role == "admin":
        return True
    for issue_id in await media_store(ctx).referencing(media_id):
        state, _ = await load_existing_state(ctx.store, issue_id)
        if state.exists and any(m.id == media_id for m in state.media) and may_read_issue(ctx, p, state):
            return True
    return False


@router.get("/v1/media/{media_id}", responses={200: {"description": "the photo (or its JPEG thumbnail)",
                                                      "content": {t: _BINARY for t in probe.TYPES}}})
async def get_media(media_id: str, ctx: Ctx, p: Actor,
                    size: Annotated[str | None, Query(pattern="^thumb$", description="thumb: the thumbnail")] = None
                    ) -> Response:
    """The photo as stored (``?size=thumb``: its JPEG thumbnail), to a caller who may read an issue that
    references it."""
    if not MEDIA_ID.match(media_id):
        raise NotFound(f"medium {media_id} not found", field="id")
    if not await may_read(ctx, p, media_id):
        raise NotAllowed(f"no issue that {p.role} scope {p.scope or '-'} may read references medium {media_id}")
    store = media_store(ctx)
    info = await store.info(media_id)
    if info is None:
        raise NotFound(f"medium {media_id} not found", field="id")
    headers = {"ETag": f'"{media_id}{"-thumb" if size else ""}"', "Cache-Control": "private, max-age=86400, immutable"}
    if size == "thumb":
        return Response(await store.thumbnail(media_id), media_type="image/jpeg", headers=headers)
    spool = tempfile.SpooledTemporaryFile(max_size=1 << 20, mode="w+b", dir=str(_workdir(ctx)))
    try:
        await store.read_into(media_id, spool)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)

    async def body() -> AsyncIterator[bytes]:
        try:
            while chunk := await asyncio.to_thread(spool.read, 256 * 1024):
                yield chunk
        finally:
            spool.close()

    headers["Content-Length"] = str(info.size)
    return StreamingResponse(body(), media_type=info.content_type, headers=headers)
