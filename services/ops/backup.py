"""``needle backup`` / ``needle restore``: every stream needle owns, snapshotted through JetStream's API
into a directory with a manifest, and restored into an empty needle, whose read models are then
rebuilt from the restored events.

Layout of a backup directory::

    backup.json             manifest: format, when, and per stream its config, state (first/last
                            sequence, message count, bytes), file name, size and sha256
    NEEDLE_EVENTS.tar.s2    the server's snapshot of each stream (with its consumers)
    NEEDLE_TIMERS.tar.s2    pending SLA timers (message schedules) and the router's timer consumer
    KV_NEEDLE_RESIDENT_KEYS.tar.s2   residents' data keys (unless --no-resident-keys): without them the
                            sealed personal data in the events cannot be read after a restore
    KV_NEEDLE_WEBHOOKS.tar.s2, KV_NEEDLE_WEBHOOK_DLQ.tar.s2   webhook registrations, dead letters
    KV_NEEDLE_REVOKED.tar.s2   token revocations (and any other NEEDLE_* stream or KV_NEEDLE_* bucket)
    OBJ_NEEDLE_MEDIA.tar.s2, KV_NEEDLE_MEDIA_REFS.tar.s2   photos (evidence) and which issues reference them

Postgres is not in it: the read models are derived and are rebuilt on restore. With the residents' keys
in it, a backup is as sensitive as the keys, and a resident forgotten after it was taken comes back
with a restore: keep backups no longer than erasure requests may wait, or back up without the keys.
Secrets (the token key, NATS passwords) are not in it: tokens of the old needle are not accepted by a new
data dir."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from nats.aio.client import Client as NATS

from shared.events import subjects as sj
from shared.files import open_private, private_dir, write_private
from shared.store import snapshots as snap

FORMAT = "needle-backup/1"
MANIFEST = "backup.json"
STATE_KEYS = ("messages", "bytes", "first_seq", "last_seq", "num_subjects", "consumer_count")
# the source of truth first: a failure later leaves the most important stream restored
ORDER = (sj.EVENTS_STREAM, sj.TIMERS_STREAM)
KEYS_STREAM = "KV_NEEDLE_RESIDENT_KEYS"  # residents' data keys (shared/privacy/keystore.py)
Announce = Callable[[str, int], Callable[[int], None]]  # (stream, total bytes) -> progress(bytes done)


class BackupError(RuntimeError):
    pass


def owned(name: str) -> bool:
    """The streams needle owns: NEEDLE_*, the KV buckets NEEDLE_* (KV_NEEDLE_*) and the object stores
    NEEDLE_* (OBJ_NEEDLE_*: photos)."""
    return name.startswith(("NEEDLE_", "KV_NEEDLE_", "OBJ_NEEDLE_"))


def _ordered(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


async def backup(nc: NATS, target: Path, *, announce: Announce | None = None, consumers: bool = True,
                 resident_keys: bool = True) -> dict[str, Any]:
    """Snapshot every stream needle owns into ``target`` (created; must hold no backup yet). Without
    ``resident_keys`` the residents' data keys are left out: a restore then cannot read any resident's
    sealed personal data (everyone is shredded), but the backup holds no personal data in clear reach."""
    if (target / MANIFEST).exists():
        raise BackupError(f"{target} already holds a backup ({MANIFEST}); choose an empty directory")
    private_dir(target)  # 0700: the snapshots hold every event (and, unless left out, the residents' keys)
    names = _ordered([n for n in await snap.stream_names(nc) if owned(n) and (resident_keys or n != KEYS_STREAM)])
    if sj.EVENTS_STREAM not in names:
        raise BackupError(f"no {sj.EVENTS_STREAM} stream on this server: nothing to back up")
    entries = []
    for name in names:
        info = await snap.stream_info(nc, name)
        total = int((info or {}).get("state", {}).get("bytes", 0))
        tick = announce(name, total) if announce else None
        path = target / f"{name}.tar.s2"
        with os.fdopen(open_private(path), "wb") as out:  # 0600 from the start
            s = await snap.snapshot(nc, name, out, consumers=consumers, progress=tick)
        entries.append({"name": name, "file": path.name, "size": s.bytes, "sha256": s.sha256, "config": s.config,
                        "state": {k: s.state.get(k) for k in STATE_KEYS if k in s.state}})
    manifest = {"format": FORMAT, "created_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "consumers": consumers, "streams": entries}
    write_private(target / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False))
    return manifest


def read_manifest(source: Path) -> dict[str, Any]:
    """The manifest of a backup directory, with every file checked against its size and sha256."""
    path = source / MANIFEST
    if not path.exists():
        raise BackupError(f"{source} is not a needle backup (no {MANIFEST})")
    manifest: dict[str, Any] = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    for entry in manifest["streams"]:
        file = source / entry["file"]
        if not file.exists():
            raise BackupError(f"{file} is missing")
        if file.stat().st_size != entry["size"] or _sha256(file) != entry["sha256"]:
            raise BackupError(f"{file} does not match its sha256 in {MANIFEST}: the backup is damaged")
    return manifest


async def restore(nc: NATS, source: Path, *, force: bool = False, announce: Announce | None = None
                  ) -> dict[str, Any]:
    """Restore every stream of the backup in ``source``. Refuses when one of them exists, unless
    ``force`` (then the existing stream is deleted first). Returns the manifest."""
    manifest = read_manifest(source)
    existing = set(await snap.stream_names(nc))
    clash = [e["name"] for e in manifest["streams"] if e["name"] in existing]
    if clash and not force:
        raise BackupError(f"refusing to overwrite existing streams {', '.join(clash)} (restore into an empty "
                          "needle, or pass --force to delete them first)")
    for entry in manifest["streams"]:
        name = entry["name"]
        if name in existing:
            await snap.delete_stream(nc, name)
        tick = announce(name, int(entry["size"])) if announce else None
        with open(source / entry["file"], "rb") as src:
            info = await snap.restore(nc, entry["config"], entry["state"], src, progress=tick)
        got = info.get("state", {})
        keys = ("messages", "first_seq", "last_seq") if entry["state"].get("messages") else ("messages", "last_seq")
        for key in keys:  # (an empty stream's first_seq is 0 or 1 depending on who asks)
            if key in entry["state"] and got.get(key) != entry["state"][key]:
                raise BackupError(f"restored {name} has {key} {got.get(key)}, the backup says {entry['state'][key]}")
    if any(e["name"] == KEYS_STREAM for e in manifest["streams"]):
        manifest["forgotten_again"] = await reapply_forgets(nc)
        manifest["shredded_again"] = await reapply_shreds(nc)
    return manifest


async def reapply_shreds(nc: NATS) -> int:
    """Destroy again every issue key the restored events say was shredded (the bucket and the events are cut
    one after the other: a backup may hold a shredded issue's key). A key made after the shred (text written
    later) has another id and stays."""
    from shared.privacy.issuekeys import IssueKeys

    resp = orjson.loads((await nc.request(f"$JS.API.STREAM.INFO.{sj.EVENTS_STREAM}", orjson.dumps(
        {"subjects_filter": sj.issue_event("*", "issue_text_shredded")}), timeout=10)).data)
    subjects = sorted(resp.get("state", {}).get("subjects") or {})
    if not subjects:
        return 0
    js = nc.jetstream()
    keys = IssueKeys(nc, kek=None)
    await keys.start(watch=False)
    destroyed = 0
    for subject in subjects:
        issue_id = subject.split(".")[3]
        shredded = orjson.loads((await js.get_last_msg(sj.EVENTS_STREAM, subject)).data or b"{}")
        key_id = (shredded.get("data") or {}).get("key_id")
        if key_id is not None and await keys.key_id_of(issue_id) == key_id and await keys.destroy(issue_id):
            destroyed += 1
    return destroyed


async def reapply_forgets(nc: NATS) -> int:
    """Destroy every key of a resident whom the restored events say was forgotten. A forget appends
    resident_forgotten first and destroys the key next, and the streams are cut one after the other:
    a backup may hold both. A restored needle never holds a key its own events say is gone."""
    from shared.privacy.keystore import ResidentKeys

    resp = orjson.loads((await nc.request(f"$JS.API.STREAM.INFO.{sj.EVENTS_STREAM}", orjson.dumps(
        {"subjects_filter": sj.resident_event("*", "resident_forgotten")}), timeout=10)).data)
    subjects = sorted(resp.get("state", {}).get("subjects") or {})
    if not subjects:
        return 0
    # the subject names a keyed HMAC of the resident (shared/privacy/keystore.py, subject_token): the id is
    # read from the events themselves (before, it was the subject's token)
    js = nc.jetstream()
    found: set[str] = set()
    for subject in subjects:
        msg = await js.get_last_msg(sj.EVENTS_STREAM, subject)
        try:
            body = orjson.loads(msg.data or b"{}")
            found.add(str(body["data"]["resident_id"]))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            found.add(subject.split(".")[3])  # written by an earlier needle: the token is the id
    ids = sorted(found)
    keys = ResidentKeys(nc)
    await keys.start(watch=False)
    destroyed = 0
    for resident_id in ids:
        _, key = await keys.find(resident_id)
        if key is not None:
            await keys.destroy(key)
            destroyed += 1
    return destroyed


async def rebuild_read_models(nc: NATS, database_url: str, org: Any, tz: Any,
                              progress: Callable[[int, int, float], None] | None = None,
                              texts: Any = None) -> dict[str, float]:
    """Bring the read-model schema up to date and rebuild it from the (restored) stream."""
    from services.projections.migrate import upgrade
    from services.projections.rebuild import rebuild
    from services.projections.service import open_pool
    from services.projections.worker import ProjectionWriter

    await upgrade(database_url)
    pool = await open_pool(database_url)
    try:
        return await rebuild(pool, nc.jetstream(), ProjectionWriter(org, tz), progress, texts=texts)
    finally:
        await pool.close()
