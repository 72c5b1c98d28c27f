"""Residents' data keys, kept OUTSIDE the event stream in the JetStream KV bucket NEEDLE_RESIDENT_KEYS.

Why a KV bucket and not Postgres: Postgres holds read models that may be dropped and rebuilt at any
time (losing the keys would shred everyone), and a deleted Postgres row lives on in dead tuples and
WAL. The bucket is its own stream (``KV_NEEDLE_RESIDENT_KEYS``), so a backup or mirror of
NEEDLE_EVENTS never holds a key; it keeps one revision per key (history 1) and, unlike the KV streams
nats-py creates, allows deleting a message, so that forgetting a resident *erases* the message that
held the key (``STREAM.MSG.DELETE`` overwrites it on disk) before purging the key (a purge marker
tells every process's cache).

Keys of the bucket:

* ``h.<HMAC(index secret, id)>`` -> ``{"key_id", "wrapped", "index"}``: the resident's AES-256 data key,
  wrapped with the key-encryption key kept in ``DIR/secrets`` (never in NATS). The entry's name is a subject
  token, so it holds an HMAC of the id, never the id. Keys stored by an earlier needle stay readable under
  ``r.<resident id>`` -> ``{"key_id", "key" (base64), "index"}``.
* ``q.<HMAC(phone)>.<HMAC(id)>`` -> resident id: a resident reported under a caller's id with a phone, so
  that forgetting the phone reaches them.
* ``p.<HMAC(index secret, phone)>`` -> resident id: the phone index, so one phone's reports share a
  key and ``needle forget`` may be given the phone. It is purged with the key: after a forget nothing
  links the (random) resident id left in the stream to a phone, and a new report of the same phone
  makes a new resident with a new key.
* ``meta.index-secret``: the HMAC secret of the phone index, made once (create-if-absent).

Creating is race-safe: ``create`` is "only if absent" (an expected-last-sequence of 0), so two first
reports of one new phone at once end with one resident and one key (the loser reads the winner's).
"""
from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from shared.domain.errors import Unavailable
from shared.events.subjects import valid_token
from shared.files import create_private_once
from shared.settings import Settings
from shared.store.settling import JetStreamRefused, settled

from . import sealing

log = structlog.get_logger("needle.residents")

BUCKET = "NEEDLE_RESIDENT_KEYS"
KV_STREAM = f"KV_{BUCKET}"
KV_PREFIX = f"$KV.{BUCKET}."
SECRET_KEY = "meta.index-secret"
CACHE_TTL_S = 30.0  # bound on a stale key in another process should its watch be down (normally ~ms)
CACHE_MAX = 50_000


def bucket_config(replicas: int = 1) -> dict[str, object]:
    return {
        "name": KV_STREAM,
        "subjects": [f"{KV_PREFIX}>"],
        "storage": "file",
        "retention": "limits",
        "num_replicas": replicas,
        "max_msgs_per_subject": 1,  # history 1: no old revision of a key is kept
        "max_msgs": -1, "max_bytes": -1, "max_age": 0, "max_msg_size": -1, "max_consumers": -1,
        "discard": "new",
        "allow_rollup_hdrs": True,
        "deny_delete": False,  # forgetting erases the key's message (secure delete), see the module doc
        "deny_purge": False,
        "allow_direct": True,
        "allow_atomic": True,  # the issues' keys are made ahead in atomic batches (issuekeys.reserve)
        "duplicate_window": 120 * 10**9,
    }


KEK_FILE = "secrets/resident-kek.key"  # the key-encryption key of the residents' data keys, never in NATS
KEK_COMMAND = "NEEDLE_KEK_COMMAND"


class KekUnavailable(RuntimeError):
    """No key-encryption key: the process refuses to start. The message is one line and never holds what
    the KEK command printed."""


def parse_kek(raw: bytes, source: str) -> bytes:
    """32 bytes from 64 hex characters (whitespace around them allowed), else KekUnavailable naming
    ``source`` and never echoing ``raw``."""
    text = raw.strip()
    if len(text) != 64 or text.strip(b"0123456789abcdefABCDEF"):
        got = f"{len(text)} characters" if len(text) != 64 else "characters that are not all hex"
        raise KekUnavailable(f"{source} did not give a key-encryption key: expected 64 hex characters "
                             f"(32 bytes), got {got}")
    return bytes.fromhex(text.decode("ascii"))


def run_kek_command(command: str, timeout_s: float = 30.0) -> bytes:
    """The KEK a KMS hook prints: ``command`` split like a POSIX shell (``shlex``) and run without a shell,
    stdin empty, stderr left to ours (its diagnostics reach needle's log), stdout captured in memory only.
    KekUnavailable (one line, never the output) when it cannot be run, fails, outlives ``timeout_s`` or
    prints anything but 64 hex characters."""
    import shlex
    import subprocess

    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise KekUnavailable(f"{KEK_COMMAND} is not a valid command line: {exc}") from None
    if not argv:
        raise KekUnavailable(f"{KEK_COMMAND} is empty")
    what = f"{KEK_COMMAND} ({Path(argv[0]).name})"  # the program only: its arguments may name secrets' paths
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, close_fds=True)
    except OSError as exc:
        raise KekUnavailable(f"{what} could not be run: {exc.strerror or exc}") from None
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        raise KekUnavailable(f"{what} gave no key within {timeout_s:g} s (NEEDLE_KEK_COMMAND_TIMEOUT_S)") from None
    if proc.returncode != 0:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"failed with exit status {proc.returncode}")
        raise KekUnavailable(f"{what} {how} (its own messages, if any, are on stderr)")
    return parse_kek(out, what)


async def last_entries(nc: NATS, pattern: str) -> list[KeyValue.Entry]:
    """The last message of every key of the bucket matching ``pattern`` (deletion markers included, as
    ``operation`` DEL or PURGE), read through a pull consumer: it counts what it will deliver before delivering
    anything. (nats-py's ``KeyValue.watch`` can signal "no more" before the first entry when the server pushes
    the entries before its consumer-info answer: a loaded machine then read an empty bucket.)"""
    js = nc.jetstream()
    sub = await js.pull_subscribe(f"{KV_PREFIX}{pattern}", stream=KV_STREAM, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE, inactive_threshold=60.0))
    out: list[KeyValue.Entry] = []
    try:
        left = (await sub.consumer_info()).num_pending or 0
        while left > 0:
            for msg in await sub.fetch(min(left, 1000), timeout=10):
                left -= 1
                op = (msg.headers or {}).get("KV-Operation")
                meta = msg.metadata
                out.append(KeyValue.Entry(bucket=BUCKET, key=msg.subject[len(KV_PREFIX):], value=msg.data,
                                          revision=meta.sequence.stream, delta=meta.num_pending,
                                          created=None, operation=op))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


def load_or_create_kek(settings: Settings, *, create: bool = True) -> bytes:
    """The key-encryption key, the one way every process gets it.

    With ``settings.kek_command`` (NEEDLE_KEK_COMMAND): what that command prints (``run_kek_command``), held
    in memory only; a ``DIR/secrets/resident-kek.key`` left from before must hold the same key (else the
    keys it wrapped would no longer open: refused). Without: 32 random bytes (hex) in that file, created 0600
    in the 0700 ``secrets/`` (unless ``create`` is false: then it must exist). Every process of one needle
    gets the same key; a backup of the key bucket is of no use without it. KekUnavailable when there is none."""
    path = Path(settings.data_dir) / KEK_FILE
    if settings.kek_command:
        kek = run_kek_command(settings.kek_command, settings.kek_command_timeout_s)
        if path.exists():
            if parse_kek(path.read_bytes(), str(path)) != kek:
                raise KekUnavailable(f"{KEK_COMMAND} gives another key-encryption key than {path}: the keys "
                                     f"wrapped with that file would no longer open; put its key in the KMS, then "
                                     f"remove the file")
            log.warning("the key-encryption key is still on disk though NEEDLE_KEK_COMMAND supplies it: "
                        "remove the file (shred it)", path=str(path))
        return kek
    if not create and not path.exists():
        raise KekUnavailable(f"no key-encryption key: {path} does not exist and {KEK_COMMAND} is not set "
                             f"(use the data dir of the running needle, or its KMS command)")
    return parse_kek(create_private_once(path, secrets.token_hex(32)).encode(), str(path))


def _wrap(kek: bytes, resident_id: str, key_id: str, key: bytes) -> str:
    nonce = secrets.token_bytes(12)
    return sealing.b64(nonce + AESGCM(kek).encrypt(nonce, key, f"{resident_id}\x00{key_id}".encode()))


def _unwrap(kek: bytes, resident_id: str, key_id: str, blob: str) -> bytes:
    raw = sealing.unb64(blob)
    try:
        return AESGCM(kek).decrypt(raw[:12], raw[12:], f"{resident_id}\x00{key_id}".encode())
    except InvalidTag:
        raise KeyStoreError(f"the data key of resident {resident_id} does not open with this key-encryption "
                            f"key ({KEK_FILE} or {KEK_COMMAND})") from None


@dataclass(frozen=True, slots=True)
class ResidentKey:
    resident_id: str
    key_id: str
    key: bytes
    index: str | None  # the phone index entry pointing here, if any
    revision: int = 0
    name: str = ""  # its entry in the bucket: h.<HMAC(id)>, or r.<id> for a key made before

    def encode(self, kek: bytes | None = None) -> bytes:
        """The bucket's value: the data key wrapped with ``kek`` (AES-256-GCM bound to the resident and the
        key id) when there is one, else as it is (needles before the key-encryption key)."""
        if kek is None:
            return orjson.dumps({"key_id": self.key_id, "key": sealing.b64(self.key), "index": self.index})
        return orjson.dumps({"key_id": self.key_id, "wrapped": _wrap(kek, self.resident_id, self.key_id, self.key),
                             "index": self.index})

    @classmethod
    def decode(cls, resident_id: str, raw: bytes, revision: int, kek: bytes | None = None,
               name: str = "") -> ResidentKey:
        d = orjson.loads(raw)
        if "wrapped" in d:  # without the key-encryption key: b"", good for destroying the key only
            key = _unwrap(kek, resident_id, d["key_id"], d["wrapped"]) if kek is not None else b""
        else:
            key = sealing.unb64(d["key"])
        return cls(resident_id, d["key_id"], key, d.get("index"), revision, name or f"r.{resident_id}")


@dataclass(frozen=True, slots=True)
class Forgotten:
    resident_id: str
    key_ids: tuple[str, ...]  # empty: there was no key (unknown resident, or already forgotten)


@dataclass(frozen=True, slots=True)
class Rewrapped:
    """What ``ResidentKeys.rewrap`` did."""
    total: int  # residents whose key needed wrapping or moving
    wrapped: int  # unwrapped keys now wrapped with the KEK, under h.<HMAC(id)>
    moved: int  # keys wrapped already, moved from r.<id> to h.<HMAC(id)>
    markers: int  # r.<id> deletion markers (left by forgetting such a key) erased: they named the id
    left: tuple[str, ...]  # why some keys were left as they were (no resident id named)
    checked: bool  # the KEK opened a key wrapped before (it is the needle's, not another one)

    @property
    def changed(self) -> bool:
        return bool(self.wrapped or self.moved or self.markers)


class KeyStoreError(JetStreamRefused):
    """The residents' key bucket could not be set up; ``err_code`` is JetStream's, when it refused."""


async def ensure_bucket(nc: NATS, replicas: int = 1) -> None:
    cfg = bucket_config(replicas)
    for verb in ("CREATE", "UPDATE"):
        resp = json.loads((await nc.request(f"$JS.API.STREAM.{verb}.{KV_STREAM}", json.dumps(cfg).encode(),
                                            timeout=10)).data)
        err = resp.get("error")
        if not err:
            return
        if err.get("err_code") != 10058:  # anything but "already in use"
            raise KeyStoreError(f"bucket {BUCKET}: {err.get('description')} (err_code {err.get('err_code')})",
                                err.get("err_code"))
    raise KeyStoreError(f"bucket {BUCKET}: could not be created or updated")


def new_resident_id() -> str:
    return "res_" + secrets.token_hex(12)


class ResidentKeys:
    """The keys of one needle, with a small cache that a watch on the bucket invalidates at once (any
    change of ``r.<id>``) and that never serves an entry older than CACHE_TTL_S."""

    def __init__(self, nc: NATS, *, replicas: int = 1, ttl_s: float = CACHE_TTL_S, kek: bytes | None = None) -> None:
        self.nc, self.replicas, self.ttl_s = nc, replicas, ttl_s
        self.kek = kek  # wraps every new data key (load_or_create_kek); None: keys are stored unwrapped
        self._kv: KeyValue | None = None
        self._secret: bytes | None = None
        self._cache: dict[str, tuple[ResidentKey | None, float]] = {}
        self._ids: dict[str, str] = {}  # HMAC -> resident id, for the watch's cache invalidation
        self._watch: Any = None

    async def start(self, watch: bool = True, settle_s: float = 15.0) -> None:
        """Create (or find) the bucket. On a cluster a stream just created, by this process or another one
        starting at the same moment, may not answer until its Raft group has a leader: asked again a while
        (a service died at start-up with BucketNotFoundError in the fault smoke before)."""
        await settled("resident keys bucket", lambda: ensure_bucket(self.nc, self.replicas), within_s=settle_s)
        self._kv = await settled("resident keys bucket", lambda: self.nc.jetstream().key_value(BUCKET),
                                 within_s=settle_s)
        if watch:
            # the residents' entries only: the issues' keys (i.*) share the bucket and have a watch of their own
            subjects = [f"{KV_PREFIX}h.>", f"{KV_PREFIX}r.>"]
            self._watch = await self.nc.jetstream().subscribe(
                subjects[0], stream=KV_STREAM, cb=self._on_change, ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, headers_only=True, filter_subjects=subjects))

    async def close(self) -> None:
        if self._watch is not None:
            with contextlib.suppress(Exception):
                await self._watch.unsubscribe()
            self._watch = None

    async def _on_change(self, msg: Msg) -> None:
        name = msg.subject[len(KV_PREFIX):]
        if name.startswith("h."):
            resident_id = self._ids.get(name[2:])
            if resident_id is not None:
                self._cache.pop(resident_id, None)
        elif name.startswith("r."):
            self._cache.pop(name[2:], None)

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise KeyStoreError("resident keys not started")
        return self._kv

    # -- reading ------------------------------------------------------------------------------------
    async def _entry(self, key: str) -> Any:
        try:
            return await self.kv.get(key)
        except KeyNotFoundError:
            return None
        except (NatsError, TimeoutError) as exc:  # NATS down or slow: retrying helps (503), never a 500
            raise Unavailable("residents' keys did not answer in time") from exc

    async def lookup(self, resident_id: str) -> ResidentKey | None:
        """The resident's current key, or None once forgotten (cached, see the class doc)."""
        now = time.monotonic()
        hit = self._cache.get(resident_id)
        if hit is not None and hit[1] > now:
            return hit[0]
        name = await self.entry_name(resident_id)
        entry = await self._entry(name)
        if entry is None:  # a key made before keys were named by an HMAC of the id
            name = f"r.{resident_id}"
            entry = await self._entry(name)
        key = (ResidentKey.decode(resident_id, entry.value, entry.revision, self.kek, name)
               if entry is not None else None)
        self._remember(resident_id, key)
        return key

    async def entry_name(self, resident_id: str) -> str:
        """The bucket entry of a resident's key: ``h.<HMAC(id)>``. The entry name is a NATS subject token
        (``$KV.NEEDLE_RESIDENT_KEYS.h.…``), so it never holds the id (which may be a register number)."""
        digest = (await self.subject_token(resident_id))[1:]
        if len(self._ids) >= CACHE_MAX:
            self._ids.clear()
        self._ids[digest] = resident_id
        return f"h.{digest}"

    def _remember(self, resident_id: str, key: ResidentKey | None) -> None:
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[resident_id] = (key, time.monotonic() + self.ttl_s)

    async def index_secret(self) -> bytes:
        if self._secret is None:
            entry = await self._entry(SECRET_KEY)
            if entry is None:
                with contextlib.suppress(KeyWrongLastSequenceError):  # another process made it first
                    await self.kv.create(SECRET_KEY, sealing.b64(secrets.token_bytes(32)).encode())
                entry = await self._entry(SECRET_KEY)
                if entry is None:
                    raise KeyStoreError("the phone index secret could not be read back")
            self._secret = sealing.unb64(entry.value.decode())
        return self._secret

    async def resident_of_phone(self, phone_e164: str) -> tuple[str, str, Any]:
        """(index key, resident id or "", index entry or None) for a normalized phone."""
        index = f"p.{sealing.index_digest(await self.index_secret(), phone_e164)}"
        entry = await self._entry(index)
        return index, entry.value.decode() if entry is not None else "", entry

    # -- creating -----------------------------------------------------------------------------------
    async def _create_key(self, resident_id: str, index: str | None) -> ResidentKey | None:
        """A fresh key for ``resident_id``, or None when it already has one."""
        name = await self.entry_name(resident_id)
        key = ResidentKey(resident_id, secrets.token_hex(8), secrets.token_bytes(sealing.KEY_BYTES), index, 0, name)
        try:
            rev = await self.kv.create(name, key.encode(self.kek))
        except KeyWrongLastSequenceError:
            return None
        except (NatsError, TimeoutError) as exc:
            raise Unavailable("residents' keys could not be written in time") from exc
        key = ResidentKey(key.resident_id, key.key_id, key.key, key.index, rev, name)
        self._remember(resident_id, key)
        return key

    async def key_for_id(self, resident_id: str) -> ResidentKey:
        """The key of a resident known by a caller-given id (created on first use)."""
        for _ in range(5):
            found = await self.lookup(resident_id)
            if found is not None:
                return found
            made = await self._create_key(resident_id, None)
            if made is not None:
                return made
            self._cache.pop(resident_id, None)  # someone else created it: read theirs
        raise KeyStoreError(f"no key could be made for resident {resident_id}")

    async def key_for_phone(self, phone_e164: str) -> ResidentKey:
        """The key of the resident with this phone; a new resident (random id, new key) the first time
        and after a forget. Race-safe: concurrent first reports end with one resident."""
        for _ in range(5):
            index, resident_id, entry = await self.resident_of_phone(phone_e164)
            if resident_id:
                found = await self.lookup(resident_id)
                if found is not None:
                    return found
            made = await self._create_key(new_resident_id(), index)
            assert made is not None  # a random id is never taken
            try:
                if entry is None:
                    await self.kv.create(index, made.resident_id.encode())
                else:  # the index points at a forgotten resident: replace it, unless someone else did
                    await self.kv.update(index, made.resident_id.encode(), last=entry.revision)
                return made
            except KeyWrongLastSequenceError:  # lost the race: drop our key, use the winner's
                await self.kv.purge(made.name)
                self._cache.pop(made.resident_id, None)
        raise KeyStoreError("no key could be made for this phone")

    # -- residents known by an explicit id and a phone ---------------------------------------------------
    async def subject_token(self, resident_id: str) -> str:
        """What stands for ``resident_id`` in a NATS subject: ``r`` + a keyed HMAC, never the id itself (a
        caller's own id may be a register or ID-card number; subjects show in stream listings and filters)."""
        return "r" + sealing.index_digest(await self.index_secret(), f"resident\x00{resident_id}")[:32]

    async def _link_key(self, phone_e164: str, resident_id: str) -> str:
        secret = await self.index_secret()
        return (f"q.{sealing.index_digest(secret, phone_e164)}."
                f"{sealing.index_digest(secret, f'resident{chr(0)}{resident_id}')[:16]}")

    async def link_phone(self, phone_e164: str, resident_id: str) -> None:
        """Remember that the resident a caller named ``resident_id`` gave this phone (keyed HMACs only), so
        that forgetting the phone reaches them too."""
        try:
            await self.kv.put(await self._link_key(phone_e164, resident_id), resident_id.encode())
        except (NatsError, TimeoutError) as exc:
            raise Unavailable("residents' keys could not be written in time") from exc

    async def linked_ids(self, phone_e164: str) -> list[str]:
        """The explicit ids that reported this phone (link_phone)."""
        prefix = f"q.{sealing.index_digest(await self.index_secret(), phone_e164)}."
        keys = await self._keys_like(prefix + "*")
        out = []
        for k in keys:
            entry = await self._entry(k)
            if entry is not None and entry.value:
                out.append(entry.value.decode())
        return out

    async def unlink_phone(self, phone_e164: str) -> None:
        """Drop every explicit-id link of this phone (after forgetting it: the links name those residents)."""
        prefix = f"q.{sealing.index_digest(await self.index_secret(), phone_e164)}."
        for k in await self._keys_like(prefix + "*"):
            await self.kv.purge(k)

    async def _keys_like(self, pattern: str) -> list[str]:
        """The live keys matching a subject ``pattern`` (filtered by the server, not every key)."""
        try:
            return [e.key for e in await last_entries(self.nc, pattern) if e.operation is None]
        except (NatsError, TimeoutError) as exc:
            raise Unavailable("residents' keys did not answer in time") from exc

    async def find_all(self, who: str) -> list[tuple[str, ResidentKey | None]]:
        """Every resident ``who`` names: an id names one; a phone names the resident keyed by it and every
        resident reported under an explicit id with it."""
        first = await self.find(who)
        found = [first]
        if not who.startswith("res_") and any(c.isdigit() for c in who):
            try:
                phone = sealing.normalize_phone(who)
            except ValueError:
                return found
            for rid in await self.linked_ids(phone):
                if rid != first[0] and valid_token(rid):
                    self._cache.pop(rid, None)
                    found.append((rid, await self.lookup(rid)))
        return found

    # -- forgetting ---------------------------------------------------------------------------------
    async def find(self, who: str) -> tuple[str, ResidentKey | None]:
        """A resident id or a phone number -> (resident id, current key or None)."""
        resident_id = who
        if not who.startswith("res_") and any(c.isdigit() for c in who):
            with contextlib.suppress(ValueError):
                _, rid, _ = await self.resident_of_phone(sealing.normalize_phone(who))
                if rid:
                    resident_id = rid
        if not valid_token(resident_id):
            raise ValueError("neither a resident id nor a known phone number")
        self._cache.pop(resident_id, None)
        return resident_id, await self.lookup(resident_id)

    async def destroy(self, key: ResidentKey) -> None:
        """Erase the key's message on disk, then purge the key and its phone index entry (the purge
        markers tell every process's cache). Idempotent. A copy of the key under its other name (``r.<id>``
        or ``h.<HMAC(id)>``: ``rewrap`` moving it at this moment) goes too."""
        if key.revision:
            try:
                await self.nc.jetstream().delete_msg(KV_STREAM, key.revision)  # secure erase (no_erase: false)
            except Exception as exc:  # already gone (a concurrent forget): the purge below still holds
                log.info("key message not erased", resident=key.resident_id, error=repr(exc))
        name = key.name or f"r.{key.resident_id}"
        await self.kv.purge(name)
        other = await self.entry_name(key.resident_id) if name.startswith("r.") else f"r.{key.resident_id}"
        copy = await self._entry(other)
        if copy is not None:
            await self._erase(other, copy.revision)
        self._cache.pop(key.resident_id, None)
        if key.index:
            entry = await self._entry(key.index)
            if entry is not None and entry.value.decode() == key.resident_id:
                with contextlib.suppress(Exception):
                    await self.nc.jetstream().delete_msg(KV_STREAM, entry.revision)
                await self.kv.purge(key.index)

    # -- wrapping the keys of an earlier needle ----------------------------------------------------------
    async def _erase(self, name: str, revision: int, *, marker: bool = True) -> None:
        """Erase the message ``revision`` of entry ``name`` on disk (secure delete), then, with ``marker``, purge
        the entry (the marker tells every process's cache at once) and erase that marker too when the name
        holds a resident id (``r.<id>``: no subject is left naming it)."""
        js = self.nc.jetstream()
        with contextlib.suppress(NotFoundError):  # already erased (a concurrent forget, a run that crashed)
            await js.delete_msg(KV_STREAM, revision)
        if not marker:
            return
        await self.kv.purge(name)
        if name.startswith("r."):
            await self._erase_marker(name)

    async def _erase_marker(self, name: str) -> bool:
        """Erase the deletion marker that is the last message of ``name``, if it is one."""
        js = self.nc.jetstream()
        try:
            last = await js.get_last_msg(KV_STREAM, KV_PREFIX + name)
        except NotFoundError:
            return False
        if (last.headers or {}).get("KV-Operation") not in ("DEL", "PURGE") or last.seq is None:
            return False
        with contextlib.suppress(NotFoundError):
            await js.delete_msg(KV_STREAM, last.seq)
        return True

    async def _all_entries(self) -> list[Any]:
        """The last message of every residents' entry (``h.``, ``r.``, ``p.``, ``q.``: not the issues' keys,
        ``i.``, which share the bucket and may be many), deletion markers included (``operation`` DEL or PURGE)."""
        out: list[Any] = []
        try:
            for prefix in ("h.>", "r.>", "p.>", "q.>"):
                out += await last_entries(self.nc, prefix)
        except (NatsError, TimeoutError) as exc:
            raise Unavailable("residents' keys did not answer in time") from exc
        return out

    async def rewrap(self, progress: Callable[[int, int, str], None] | None = None) -> Rewrapped:
        """Wrap with the KEK every key an earlier needle stored unwrapped, and move every key still named
        ``r.<id>`` (wrapped or not) to ``h.<HMAC(id)>``; erase the ``r.<id>`` markers forgetting such keys
        left. ``progress(n, total, what)`` after each resident. Idempotent: a second run changes nothing.

        Refuses (KeyStoreError, nothing changed) without a KEK, or when the KEK does not open a key wrapped
        before (it is not this needle's). Never loses a key if stopped at any point: each step writes the
        new entry before it erases the old one, and lookups find either (``h.`` first, then ``r.``)."""
        if self.kek is None:
            raise KeyStoreError("no key-encryption key: nothing can be wrapped")
        entries = await self._all_entries()
        live = {e.key: e for e in entries if e.operation is None}
        markers = [e.key for e in entries if e.operation is not None and e.key.startswith("r.")]
        ids = {e.value.decode() for k, e in live.items() if k.startswith(("p.", "q.")) and e.value}
        ids |= {k[2:] for k in live if k.startswith("r.")}
        by_name = {await self.entry_name(rid): rid for rid in sorted(ids) if valid_token(rid)}

        def unwrapped(e: Any) -> bool:
            return "wrapped" not in orjson.loads(e.value)

        todo = sorted({k[2:] for k in live if k.startswith("r.")}
                      | {by_name[k] for k, e in live.items() if k.startswith("h.") and k in by_name and unwrapped(e)})
        unknown = sum(1 for k, e in live.items() if k.startswith("h.") and k not in by_name and unwrapped(e))
        checked = await self._check_kek(live, by_name)
        wrapped = moved = 0
        left: list[str] = []
        for n, rid in enumerate(todo, 1):
            try:
                what = await self._rewrap_one(rid)
            except KeyStoreError as exc:
                what = f"left: {exc}"
                left.append(what)
            wrapped += what == "wrapped"
            moved += what == "moved"
            if progress is not None:
                progress(n, len(todo), what)
        erased = sum([await self._erase_marker(name) for name in markers])
        if unknown:
            left.append(f"{unknown} unwrapped key(s) under h.<HMAC(id)> whose resident id the bucket does not name "
                        "(reported under a caller's id without a phone): forget them or report them again")
        return Rewrapped(len(todo), wrapped, moved, erased, tuple(left), checked)

    async def _check_kek(self, live: dict[str, Any], by_name: dict[str, str]) -> bool:
        """True when the KEK opened a key wrapped before; False when there is none to try. KeyStoreError
        (nothing changed) when it does not open one: another needle's KEK would make every key it wraps
        unreadable to this needle."""
        for name, entry in live.items():
            rid = name[2:] if name.startswith("r.") else by_name.get(name) if name.startswith("h.") else None
            if rid is not None and "wrapped" in orjson.loads(entry.value):
                try:
                    ResidentKey.decode(rid, entry.value, entry.revision, self.kek, name)
                except KeyStoreError:
                    raise KeyStoreError("this key-encryption key does not open the keys this needle wrapped "
                                        "before: it is not this needle's (nothing changed)") from None
                return True
        return False

    async def _rewrap_one(self, resident_id: str) -> str:
        """Bring one resident's key to ``h.<HMAC(id)>``, wrapped: "wrapped", "moved" or "nothing"."""
        assert self.kek is not None
        h_name, r_name = await self.entry_name(resident_id), f"r.{resident_id}"
        h, r = await self._entry(h_name), await self._entry(r_name)
        what = "nothing"
        if h is not None and "wrapped" not in orjson.loads(h.value):
            # an unwrapped h.<HMAC> entry: wrap a copy under r.<id> first (lookups find it there), then erase it
            key = ResidentKey.decode(resident_id, h.value, h.revision, self.kek, h_name)
            if r is None:
                with contextlib.suppress(KeyWrongLastSequenceError):
                    await self.kv.create(r_name, key.encode(self.kek))
                r = await self._entry(r_name)
            if r is None or ResidentKey.decode(resident_id, r.value, r.revision, self.kek, r_name).key != key.key:
                raise KeyStoreError("two different keys for one resident; left as they are")
            await self._erase(h_name, h.revision, marker=False)  # its name stays: re-created just below
            h, what = None, "wrapped"
        if r is None:
            return what
        old = ResidentKey.decode(resident_id, r.value, r.revision, self.kek, r_name)  # the KEK opens it, or refused
        if what == "nothing":
            what = "wrapped" if "wrapped" not in orjson.loads(r.value) else "moved"
        if h is None:
            with contextlib.suppress(KeyWrongLastSequenceError):  # made meanwhile: checked below
                await self.kv.create(h_name, old.encode(self.kek))
            h = await self._entry(h_name)
            again = await self._entry(r_name)
            if again is None or again.revision != r.revision:  # forgotten meanwhile: so is the copy just made
                if h is not None:
                    await self._erase(h_name, h.revision)
                return "forgotten meanwhile"
        if h is None or ResidentKey.decode(resident_id, h.value, h.revision, self.kek, h_name).key != old.key:
            raise KeyStoreError("two different keys for one resident; left as they are")
        await self._erase(r_name, r.revision)
        self._cache.pop(resident_id, None)
        return what
