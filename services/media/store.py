"""The media store: a JetStream Object Store bucket (``NEEDLE_MEDIA``) in the same NATS as the events,
replicated like them, plus a KV bucket (``NEEDLE_MEDIA_REFS``) that indexes which issues reference a
medium (key ``<media id>.<issue id>``).

Objects: ``<id>`` (the photo as stored) and ``<id>.thumb`` (its JPEG thumbnail, written first, so a stored
photo always has one); the description holds ``{content_type, width, height}`` as JSON.

The reference index is written *before* the event that references the medium is appended, and a reader
is let in only when the issue's own events (the source of truth) reference it: an index entry whose
append then failed widens nothing. Both buckets are NEEDLE-owned streams (``OBJ_NEEDLE_MEDIA``,
``KV_NEEDLE_MEDIA_REFS``), so ``needle backup``/``restore`` keep them.
"""
from __future__ import annotations

import asyncio
import io
import json
from dataclasses import dataclass
from typing import IO, Any

from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, ObjectMeta, ObjectStoreConfig, StorageType
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from shared.domain.errors import Unavailable

from .probe import Prepared

BUCKET = "NEEDLE_MEDIA"
REFS_BUCKET = "NEEDLE_MEDIA_REFS"
THUMB = ".thumb"


@dataclass(frozen=True, slots=True)
class MediaInfo:
    id: str
    content_type: str
    size: int
    width: int
    height: int

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "sha256": self.id, "content_type": self.content_type, "bytes": self.size,
                "width": self.width, "height": self.height}


class MediaStore:
    """Opened (or created) on first use, so a process that never sees a photo never makes the buckets."""

    def __init__(self, nc: NATS, replicas: int = 1) -> None:
        self.nc, self.replicas = nc, replicas
        self._obj: ObjectStore | None = None
        self._refs: KeyValue | None = None
        self._lock = asyncio.Lock()

    async def _open(self) -> tuple[ObjectStore, KeyValue]:
        if self._obj is not None and self._refs is not None:
            return self._obj, self._refs
        async with self._lock:
            if self._obj is None or self._refs is None:
                js = self.nc.jetstream()
                try:
                    self._obj = await _object_store(js, self.replicas)
                    self._refs = await _refs_bucket(js, self.replicas)
                except (TimeoutError, BadRequestError) as e:
                    raise Unavailable(f"the media store is not available: {e!r}") from e
            return self._obj, self._refs

    async def info(self, media_id: str) -> MediaInfo | None:
        obj, _ = await self._open()
        try:
            info = await obj.get_info(media_id)
        except (ObjectNotFoundError, NotFoundError):
            return None
        meta = json.loads(info.description or "{}")
        return MediaInfo(media_id, meta.get("content_type", "application/octet-stream"), int(info.size or 0),
                         int(meta.get("width", 0)), int(meta.get("height", 0)))

    async def put(self, p: Prepared) -> MediaInfo:
        """Store the prepared photo under its sha256 (idempotent: an id already stored is left as it is)."""
        known = await self.info(p.sha256)
        if known is not None:
            return known
        obj, _ = await self._open()
        description = json.dumps({"content_type": p.content_type, "width": p.width, "height": p.height})
        await obj.put(p.sha256 + THUMB, p.thumb, meta=ObjectMeta(name=p.sha256 + THUMB, description=json.dumps(
            {"content_type": "image/jpeg", "of": p.sha256})))
        with open(p.path, "rb") as f:
            await obj.put(p.sha256, f, meta=ObjectMeta(name=p.sha256, description=description))
        return MediaInfo(p.sha256, p.content_type, p.size, p.width, p.height)

    async def read_into(self, media_id: str, out: IO[bytes], *, thumb: bool = False) -> None:
        obj, _ = await self._open()
        await obj.get(media_id + (THUMB if thumb else ""), writeinto=out)  # type: ignore[arg-type]

    async def thumbnail(self, media_id: str) -> bytes:
        buf = io.BytesIO()
        await self.read_into(media_id, buf, thumb=True)
        return buf.getvalue()

    async def reference(self, media_ids: list[str], issue_id: str) -> None:
        """Index ``issue_id`` as referencing each medium (before the event that does is appended)."""
        if not media_ids:
            return
        _, refs = await self._open()
        for media_id in dict.fromkeys(media_ids):
            await refs.put(f"{media_id}.{issue_id}", b"")

    async def referencing(self, media_id: str) -> list[str]:
        """The issues indexed as referencing the medium (to be confirmed against their events)."""
        _, refs = await self._open()
        # a watch on the medium's keys only (KeyValue.keys would read every key of the bucket)
        watcher = await refs.watch(f"{media_id}.*", ignore_deletes=True, meta_only=True)
        keys: list[str] = []
        try:
            async for entry in watcher:
                if entry is None:  # caught up
                    break
                keys.append(entry.key)
        finally:
            await watcher.stop()
        return sorted(k.split(".", 1)[1] for k in keys if "." in k)


async def _object_store(js: Any, replicas: int) -> ObjectStore:
    try:
        store: ObjectStore = await js.object_store(BUCKET)
        return store
    except (BucketNotFoundError, NotFoundError):
        pass
    try:
        store = await js.create_object_store(BUCKET, config=ObjectStoreConfig(
            bucket=BUCKET, description="needle photos (evidence), by sha256; <id>.thumb: thumbnails",
            storage=StorageType.FILE, replicas=replicas))
    except BadRequestError:  # created meanwhile by another process
        store = await js.object_store(BUCKET)
    return store


async def _refs_bucket(js: Any, replicas: int) -> KeyValue:
    try:
        kv: KeyValue = await js.key_value(REFS_BUCKET)
        return kv
    except BucketNotFoundError:
        pass
    try:
        kv = await js.create_key_value(config=KeyValueConfig(
            bucket=REFS_BUCKET, history=1, storage=StorageType.FILE, replicas=replicas,
            description="which issues reference a medium: <media id>.<issue id>"))
    except BadRequestError:
        kv = await js.key_value(REFS_BUCKET)
    return kv
