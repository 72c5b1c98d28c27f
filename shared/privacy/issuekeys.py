"""Issues' data keys: one AES-256 key per issue, kept OUTSIDE the event stream, in the bucket of the residents'
keys (NEEDLE_RESIDENT_KEYS, shared/privacy/keystore.py: its own stream, history 1, message delete allowed, in
backups), under ``i.<issue id>`` -> ``{"key_id", "wrapped"}`` (wrapped with the key-encryption key; an issue id is
no personal data, so the entry may name it).

``seal`` runs where events are appended (shared/store/eventstore.py), ``open`` wherever events are read for
someone who may see them (the event store's loads, the read models, webhooks, the event stream, notifications).
``destroy`` is crypto-shredding: the key's message is erased on disk and the entry purged (a purge marker tells
every process's cache); the issue's sealed text reads ``[erased]`` from then on, everywhere, rebuilds included.

A key is made with the issue's first sealed text (its report) and read from a small cache that a notice on
``needle.keys.issue.destroyed`` (sent by whoever destroys a key) invalidates at once, and that never serves an
entry older than ``CACHE_TTL_S`` (a process that missed the notice, disconnected at that instant). Not a watch on
the bucket: every report makes a key, and a watch delivered each one to every process (~20% of the intake's
throughput under ``needle up``, measured).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.domain.errors import Unavailable
from shared.events import subjects as sj
from shared.events.codec import Envelope
from shared.settings import Settings
from shared.store.eventstore import WRONG_LAST_SEQUENCE
from shared.store.inbox import ReplyMux
from shared.store.settling import settled

from . import texts
from .keystore import (
    BUCKET,
    KEK_FILE,
    KV_PREFIX,
    KV_STREAM,
    KeyStoreError,
    ensure_bucket,
    last_entries,
    load_or_create_kek,
)

log = structlog.get_logger("needle.issue_keys")

PREFIX = "i."
DESTROYED = "needle.keys.issue.destroyed"  # core NATS notice: an issue's key was destroyed (payload: the issue id)
CACHE_TTL_S = 30.0
POOL_SIZE, POOL_LOW, POOL_BATCH = 256, 128, 64  # keys made ahead (reserve): kept between LOW and SIZE
POOL_TTL_S = 3600.0  # a reserved key is cached until used (nobody else knows its issue id before the report)
CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class IssueKey:
    issue_id: str
    key_id: str
    key: bytes
    revision: int = 0


def _binding(issue_id: str, key_id: str) -> bytes:
    return f"issue:{issue_id}\x00{key_id}".encode()


def encode_key(key: IssueKey, kek: bytes | None) -> bytes:
    if kek is None:  # a needle without a key-encryption key (tests of the pure parts): stored as it is
        return orjson.dumps({"key_id": key.key_id, "key": texts._b64(key.key)})
    nonce = secrets.token_bytes(12)
    wrapped = nonce + AESGCM(kek).encrypt(nonce, key.key, _binding(key.issue_id, key.key_id))
    return orjson.dumps({"key_id": key.key_id, "wrapped": texts._b64(wrapped)})


def decode_key(issue_id: str, raw: bytes, revision: int, kek: bytes | None) -> IssueKey:
    d = orjson.loads(raw)
    if "wrapped" not in d:
        return IssueKey(issue_id, d["key_id"], texts._unb64(d["key"]), revision)
    if kek is None:
        raise KeyStoreError(f"the data key of issue {issue_id} is wrapped and this process has no key-encryption key")
    blob = texts._unb64(d["wrapped"])
    try:
        key = AESGCM(kek).decrypt(blob[:12], blob[12:], _binding(issue_id, d["key_id"]))
    except InvalidTag:
        raise KeyStoreError(f"the data key of issue {issue_id} does not open with this key-encryption key") from None
    return IssueKey(issue_id, d["key_id"], key, revision)


async def issue_keys_for(nc: NATS, settings: Settings, *, watch: bool = False) -> IssueKeys:
    """The issue keys of the needle ``settings`` name (a command attached to it: rebuild, restore), opened with
    its key-encryption key (never a new one: a KEK made here would open nothing)."""
    keys = IssueKeys(nc, kek=load_or_create_kek(settings, create=False), replicas=settings.stream_replicas)
    await keys.start(watch=watch)
    return keys


def is_issue_event(env: Envelope) -> bool:
    return env.data.name not in sj.NON_ISSUE_EVENTS


class IssueKeys:
    def __init__(self, nc: NATS, *, kek: bytes | None, replicas: int = 1, ttl_s: float = CACHE_TTL_S) -> None:
        self.nc, self.kek, self.replicas, self.ttl_s = nc, kek, replicas, ttl_s
        self._kv: KeyValue | None = None
        self._cache: dict[str, tuple[IssueKey | None, float]] = {}
        self._watch: Any = None
        self._mux = ReplyMux(nc)  # the report's hot path: one request, no nats-py request machinery
        self._pool: list[str] = []  # issue ids whose keys are stored already (``reserve``)
        self._filler: asyncio.Task[None] | None = None
        self._new_id: Callable[[], str] | None = None

    async def start(self, watch: bool = True, settle_s: float = 15.0) -> None:
        await settled("data keys bucket", lambda: ensure_bucket(self.nc, self.replicas), within_s=settle_s)
        self._kv = await settled("data keys bucket", lambda: self.nc.jetstream().key_value(BUCKET), within_s=settle_s)
        if watch:  # a notice per destroyed key (not a watch on the bucket: every report makes a key)
            self._watch = await self.nc.subscribe(DESTROYED, cb=self._on_destroyed)

    async def close(self) -> None:
        if self._filler is not None:
            self._filler.cancel()
        if self._watch is not None:
            with contextlib.suppress(Exception):
                await self._watch.unsubscribe()
            self._watch = None

    async def _on_destroyed(self, msg: Msg) -> None:
        self._cache.pop(msg.data.decode(errors="replace"), None)

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise KeyStoreError("issue keys not started")
        return self._kv

    def _remember(self, issue_id: str, key: IssueKey | None, ttl_s: float | None = None) -> None:
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[issue_id] = (key, time.monotonic() + (ttl_s or self.ttl_s))

    # -- keys ---------------------------------------------------------------------------------------
    async def _entry(self, issue_id: str) -> Any:
        """The bucket's entry of the issue's key, or None (never made, or purged)."""
        try:
            return await self.kv.get(PREFIX + issue_id)
        except KeyNotFoundError:
            return None
        except (NatsError, TimeoutError) as exc:  # NATS down or slow: retrying helps (503), never a 500
            raise Unavailable("issue keys did not answer in time") from exc

    async def get(self, issue_id: str) -> IssueKey | None:
        """The issue's key; None when it has none (never made, or destroyed)."""
        hit = self._cache.get(issue_id)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        entry = await self._entry(issue_id)
        try:
            key = (decode_key(issue_id, entry.value, entry.revision or 0, self.kek)
                   if entry is not None and entry.value else None)
        except KeyStoreError as exc:  # another needle's KEK (a restore without its secrets): 503, not a crash
            raise Unavailable(f"{exc}: restore {KEK_FILE} of the needle that wrote it") from None
        self._remember(issue_id, key)
        return key

    async def key_id_of(self, issue_id: str) -> str | None:
        """The id of the issue's current key, read without unwrapping it (no key-encryption key needed)."""
        entry = await self._entry(issue_id)
        return str(orjson.loads(entry.value)["key_id"]) if entry is not None and entry.value else None

    async def get_or_create(self, issue_id: str, *, new_issue: bool = False) -> IssueKey:
        """The issue's key, made (race-safe: create only if absent) when it has none. ``new_issue``: its first
        event is being appended, so the key is most likely absent: created at once (one round trip), read
        only if it exists after all (a retried report). After a shred a new key is made: text written later is
        sealed anew, what was shredded stays erased."""
        hit = self._cache.get(issue_id)
        if hit is not None and hit[0] is not None and hit[1] > time.monotonic():
            return hit[0]  # a key reserved with its issue id (``reserve``), or read a moment ago
        for attempt in range(5):
            if not (new_issue and attempt == 0):
                found = await self.get(issue_id)
                if found is not None:
                    return found
            key = IssueKey(issue_id, secrets.token_hex(8), secrets.token_bytes(texts.KEY_BYTES))
            rev = await self._create(issue_id, encode_key(key, self.kek))
            if rev is None:  # it exists (another process, or a retry; or a purge marker after a shred): read it
                self._cache.pop(issue_id, None)
                if attempt >= 1:  # after a shred the entry's last message is a purge marker: nats-py's create
                    try:  # knows to write over it
                        rev = await self.kv.create(PREFIX + issue_id, encode_key(key, self.kek))
                    except KeyWrongLastSequenceError:
                        continue
                    except (NatsError, TimeoutError) as exc:
                        raise Unavailable("issue keys could not be written in time") from exc
                else:
                    continue
            key = dataclasses.replace(key, revision=rev)
            self._remember(issue_id, key)
            return key
        raise KeyStoreError(f"no data key could be made for issue {issue_id}")

    # -- keys made ahead, with their issue ids ------------------------------------------------------------
    async def reserve(self, new_id: Callable[[], str]) -> str:
        """An issue id whose key is already stored (made ahead in batches, off the report's path): a report
        without an Idempotency-Key takes one, so that its append waits for no key of its own. ``new_id`` makes
        the ids of the next batch. Falls back to an id without a key (made at append) when the pool is empty.
        Ids of a pool unused at exit leave keys that seal nothing (harmless)."""
        self._new_id = new_id
        if self._pool:
            issue_id = self._pool.pop()
            self._refill_soon()
            return issue_id
        self._refill_soon()
        return new_id()

    def _refill_soon(self) -> None:
        if len(self._pool) < POOL_LOW and (self._filler is None or self._filler.done()):
            self._filler = asyncio.get_running_loop().create_task(self._refill())

    async def _refill(self) -> None:
        try:
            while len(self._pool) < POOL_SIZE and self._new_id is not None:
                keys = [IssueKey(self._new_id(), secrets.token_hex(8), secrets.token_bytes(texts.KEY_BYTES))
                        for _ in range(POOL_BATCH)]
                seqs = await self._create_batch([(k.issue_id, encode_key(k, self.kek)) for k in keys])
                if seqs is None:
                    return  # refused (a collision, or a stream without atomic batches): reports make their own
                for k, seq in zip(keys, seqs, strict=True):
                    self._remember(k.issue_id, dataclasses.replace(k, revision=seq), ttl_s=POOL_TTL_S)
                    self._pool.append(k.issue_id)
        except Exception as exc:  # NATS away: the reports make their own keys meanwhile
            log.warning("issue keys not made ahead", error=repr(exc))

    async def _create_batch(self, entries: list[tuple[str, bytes]]) -> list[int] | None:
        """Store new entries in ONE atomic batch (each only if absent): their revisions, or None if refused."""
        if not self._mux.started:
            await self._mux.start()
        batch_id = f"k{secrets.token_hex(8)}"
        last = len(entries)
        for i, (issue_id, value) in enumerate(entries, 1):
            hdrs = {"Nats-Expected-Last-Subject-Sequence": "0", "Nats-Batch-Id": batch_id,
                    "Nats-Batch-Sequence": str(i)}
            if i < last:
                await self.nc.publish(f"{KV_PREFIX}{PREFIX}{issue_id}", value, headers=hdrs)
                continue
            hdrs["Nats-Batch-Commit"] = "1"
            msg = await self._mux.request(f"{KV_PREFIX}{PREFIX}{issue_id}", value, headers=hdrs, timeout=5.0)
            ack = orjson.loads(msg.data)
            if isinstance(ack.get("error"), dict):
                log.info("issue keys batch refused", error=ack["error"].get("description"))
                return None
            first = int(ack["seq"]) - last + 1
            return list(range(first, first + last))
        return None

    async def _create(self, issue_id: str, value: bytes) -> int | None:
        """Store a new entry only if the key has none (expected last subject sequence 0): its revision, or None
        when the key has a message already."""
        if not self._mux.started:
            await self._mux.start()
        try:
            msg = await self._mux.request(f"{KV_PREFIX}{PREFIX}{issue_id}", value,
                                          headers={"Nats-Expected-Last-Subject-Sequence": "0"}, timeout=5.0)
        except (NatsError, TimeoutError) as exc:
            raise Unavailable("issue keys could not be written in time") from exc
        ack = orjson.loads(msg.data)
        err = ack.get("error")
        if isinstance(err, dict):
            if err.get("err_code") == WRONG_LAST_SEQUENCE:
                return None
            raise Unavailable(f"issue keys: JetStream refused the write: {err.get('description')}")
        return int(ack["seq"])

    async def destroy(self, issue_id: str) -> bool:
        """Crypto-shred the issue's text: erase the key's message on disk, then purge the entry. Idempotent;
        True when there was a key."""
        self._cache.pop(issue_id, None)
        entry = await self._entry(issue_id)
        if entry is not None:
            try:
                await self.nc.jetstream().delete_msg(KV_STREAM, entry.revision or 0)  # secure erase (no_erase: false)
            except Exception as exc:  # already gone (a concurrent shred): the purge below still holds
                log.info("issue key message not erased", issue=issue_id, error=repr(exc))
        try:
            await self.kv.purge(PREFIX + issue_id)
        except (NatsError, TimeoutError) as exc:
            raise Unavailable("issue keys could not be written in time") from exc
        self._remember(issue_id, None)
        with contextlib.suppress(NatsError):  # every process's cache drops it (a missed notice: CACHE_TTL_S)
            await self.nc.publish(DESTROYED, issue_id.encode())
        return entry is not None and bool(entry.value)

    async def all_keys(self) -> dict[str, IssueKey]:
        """Every live issue key (a rebuild opens a whole stream with them)."""
        try:
            entries = await last_entries(self.nc, f"{PREFIX}*")
        except (NatsError, TimeoutError) as exc:
            raise Unavailable("issue keys did not answer in time") from exc
        out: dict[str, IssueKey] = {}
        for entry in entries:
            if entry.operation is None and entry.value:
                issue_id = entry.key[len(PREFIX):]
                out[issue_id] = decode_key(issue_id, entry.value, entry.revision or 0, self.kek)
        return out

    # -- sealing and opening ------------------------------------------------------------------------
    async def seal(self, envs: Sequence[Envelope]) -> list[Envelope]:
        """The envelopes as they are stored: each issue event's free text sealed with its issue's key."""
        out: list[Envelope] = []
        for env in envs:
            if env.sealed is None and is_issue_event(env) and texts.clear_fields(env.data):
                key = await self.get_or_create(env.subject, new_issue=env.id.endswith(".1"))
                data, token = texts.seal(key.key, key.key_id, secrets.token_bytes(texts.NONCE_BYTES), env.subject,
                                         env.id, env.data)
                env = dataclasses.replace(env, data=data, sealed=token)
            out.append(env)
        return out

    async def open(self, envs: Iterable[Envelope]) -> list[Envelope]:
        """The envelopes with their free text in clear, or ``[erased]`` where the issue's key is gone (and in
        events an earlier needle wrote in clear before a shred of their issue)."""
        envs = list(envs)
        await self.prefetch({e.subject for e in envs if e.sealed is not None})
        out = [await self.open_one(env) for env in envs]
        return erase_before_shreds(out)

    async def prefetch(self, issue_ids: set[str], parallel: int = 64) -> None:
        """Read the keys of ``issue_ids`` that are not cached, ``parallel`` at a time (a projection batch of many
        new issues would otherwise wait for one round trip per issue, one after the other)."""
        now = time.monotonic()
        missing = [i for i in issue_ids if (hit := self._cache.get(i)) is None or hit[1] <= now]
        if len(missing) < 2:
            return
        sem = asyncio.Semaphore(parallel)

        async def one(issue_id: str) -> None:
            async with sem:
                await self.get(issue_id)

        await asyncio.gather(*(one(i) for i in missing))

    async def open_one(self, env: Envelope) -> Envelope:
        if env.sealed is None:
            return env
        return open_with(env, await self.get(env.subject))


def erase_before_shreds(envs: list[Envelope]) -> list[Envelope]:
    """Pure: text an earlier needle recorded in clear (no ``sealed`` attribute) reads ``[erased]`` once its
    issue's text was shredded: the stream cannot forget it, readers are not shown it."""
    shredded = {e.subject: e.seq for e in envs if e.data.name == "issue_text_shredded"}
    if not shredded:
        return envs
    return [dataclasses.replace(e, data=texts.erased(e.data))
            if e.seq < shredded.get(e.subject, 0) and texts.clear_fields(e.data) else e for e in envs]


def open_with(env: Envelope, key: IssueKey | None) -> Envelope:
    """Pure: ``env`` opened with ``key`` (None, or a key made after a shred: its text reads ``[erased]``)."""
    if env.sealed is None:
        return env
    if key is None or key.key_id != texts.key_id_of(env.sealed):
        return dataclasses.replace(env, data=texts.erased(env.data), sealed=None)
    try:
        fields = texts.open_fields(key.key, env.subject, env.id, env.sealed)
    except texts.Unreadable:  # altered in the stream: shown as erased, never as a crash of the reader
        log.warning("sealed text does not open", event_id=env.id)
        return dataclasses.replace(env, data=texts.erased(env.data), sealed=None)
    return dataclasses.replace(env, data=texts.opened(env.data, fields), sealed=None)
