"""Durable webhook state in JetStream KV: registrations (``NEEDLE_WEBHOOKS``, key = webhook id) and
parked events (``NEEDLE_WEBHOOK_DLQ``, key = ``<webhook id>.<stream seq>``).

The registration record holds the signing secret (HMAC needs it in clear): keep ``$KV.NEEDLE_WEBHOOKS.>``
out of every NATS user but needle's own.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

HOOKS_BUCKET = "NEEDLE_WEBHOOKS"
DLQ_BUCKET = "NEEDLE_WEBHOOK_DLQ"
LIST_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Webhook:
    id: str
    url: str
    types: tuple[str, ...]
    area: str | None
    secret: str
    owner: str  # the registering principal's subject
    created_at: str  # RFC 3339
    start_seq: int  # first stream sequence it receives (the stream's end when it was registered)

    def public(self) -> dict[str, Any]:
        """What the API shows: never the secret."""
        return {"id": self.id, "url": self.url, "types": list(self.types), "area": self.area,
                "created_at": self.created_at}

    def to_bytes(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_bytes(cls, raw: bytes) -> Webhook:
        d = orjson.loads(raw)
        d["types"] = tuple(d["types"])
        return cls(**d)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    webhook: str
    seq: int
    event_id: str | None
    type: str | None
    subject: str
    attempts: int
    status: int | None  # last HTTP status, None when there was no response
    error: str | None
    parked_at: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.webhook}.{self.seq}"

    def to_bytes(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_bytes(cls, raw: bytes) -> DeadLetter:
        return cls(**orjson.loads(raw))


async def _bucket(js: JetStreamContext, name: str, replicas: int) -> KeyValue:
    try:
        kv = await js.key_value(name)
        info = await js.stream_info(f"KV_{name}")
        if not info.config.allow_direct:  # listing reads with batch direct get
            info.config.allow_direct = True
            await js.update_stream(info.config)
            kv = await js.key_value(name)
        return kv
    except BucketNotFoundError:
        return await js.create_key_value(config=KeyValueConfig(bucket=name, history=1, storage=StorageType.FILE,
                                                               replicas=replicas, direct=True))


async def _values(kv: KeyValue, pattern: str) -> list[bytes]:
    """The current value of every key matching ``pattern`` (deleted keys left out), read with one batch
    direct get of the last message per key: deterministic, unlike a watcher's end-of-initial-values
    marker, which can come before the values on a busy server."""
    nc = kv._js._nc
    stream, prefix = kv._stream, kv._pre
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    out: list[bytes] = []
    try:
        req = orjson.dumps({"multi_last": [f"{prefix}{pattern}"], "batch": 10_000})
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", req, reply=inbox)
        async with asyncio.timeout(LIST_TIMEOUT_S):
            while True:
                msg = await sub.next_msg(timeout=LIST_TIMEOUT_S)
                hdrs = msg.headers or {}
                status = hdrs.get("Status")
                if status in ("204", "404"):  # end of batch / nothing stored
                    break
                if status:
                    raise RuntimeError(f"listing {stream} failed: {status} {hdrs.get('Description', '')}")
                if hdrs.get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
                    continue
                out.append(msg.data)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


class Registry:
    def __init__(self, hooks: KeyValue, dlq: KeyValue) -> None:
        self.hooks, self.dlq = hooks, dlq

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int = 1) -> Registry:
        return cls(await _bucket(js, HOOKS_BUCKET, replicas), await _bucket(js, DLQ_BUCKET, replicas))

    # -- registrations -------------------------------------------------------------------------
    async def create(self, hook: Webhook) -> None:
        await self.hooks.create(hook.id, hook.to_bytes())

    async def get(self, hook_id: str) -> Webhook | None:
        try:
            entry = await self.hooks.get(hook_id)
        except KeyNotFoundError:
            return None
        return Webhook.from_bytes(entry.value) if entry.value else None

    async def all(self) -> list[Webhook]:
        hooks = [Webhook.from_bytes(v) for v in await _values(self.hooks, ">")]
        return sorted(hooks, key=lambda h: (h.created_at, h.id))

    async def delete(self, hook_id: str) -> None:
        await self.hooks.delete(hook_id)

    # -- dead letters --------------------------------------------------------------------------
    async def park(self, letter: DeadLetter) -> None:
        await self.dlq.put(letter.key, letter.to_bytes())

    async def dead_letters(self, hook_id: str) -> list[DeadLetter]:
        letters = [DeadLetter.from_bytes(v) for v in await _values(self.dlq, f"{hook_id}.*")]
        return sorted(letters, key=lambda d: d.seq)

    async def unpark(self, hook_id: str, seq: int) -> None:
        await self.dlq.delete(f"{hook_id}.{seq}")

    async def drop_dead_letters(self, hook_id: str) -> None:
        for letter in await self.dead_letters(hook_id):
            with contextlib.suppress(Exception):
                await self.dlq.purge(letter.key)
