"""NEEDLE_TIMERS moves to work-queue retention (a fired timer is deleted once the router acks it).

Streams made by earlier versions use limits retention and keep every fired copy forever; JetStream
refuses to change a stream's retention to or from work-queue (err 10052), so the stream is recreated.
Its pending schedules (and the fired copies the router has not acknowledged yet) are durable timers:
they are first copied into a plain backup stream, then the old stream is deleted, the new one
created and the copies replayed into it, and only then the backup deleted. The backup stream, marked
with the migrating process's token, is the lock between processes starting at once (``needle up`` and
its workers): the others wait until it is gone. One that stops moving was left by a process that died:
if the old stream is still there the copy was not complete (it is made again); otherwise the backup is
replayed again (a schedule replaces the pending one on its subject, and a fired timer handled twice
changes nothing: the router re-checks the issue's state).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from shared.events import subjects as sj

log = structlog.get_logger("needle.streams")

BACKUP_STREAM = f"{sj.TIMERS_STREAM}_MIGRATION"
BACKUP_ROOT = "needle.timers-migration"
TIMERS_CONSUMER = "router-timers"
_SUBJECT, _SCHEDULE, _TARGET = "Needle-Subject", "Needle-Schedule", "Needle-Schedule-Target"


async def _api(nc: NATS, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    resp: dict[str, Any] = json.loads((await nc.request(subject, json.dumps(body or {}).encode(), timeout=10)).data)
    return resp


async def stream_info(nc: NATS, name: str) -> dict[str, Any] | None:
    resp = await _api(nc, f"$JS.API.STREAM.INFO.{name}")
    if (resp.get("error") or {}).get("err_code") == 10059:  # stream not found
        return None
    if resp.get("error"):
        raise RuntimeError(f"stream {name}: {resp['error'].get('description')}")
    return resp


async def _delete_stream(nc: NATS, name: str) -> None:
    resp = await _api(nc, f"$JS.API.STREAM.DELETE.{name}")
    if resp.get("error") and resp["error"].get("err_code") != 10059:
        raise RuntimeError(f"stream {name}: {resp['error'].get('description')}")


async def _read_all(nc: NATS, stream: str) -> list[tuple[int, str, bytes, dict[str, str]]]:
    """(seq, subject, data, headers) of every message in ``stream``, oldest first."""
    js = nc.jetstream()
    sub = await js.pull_subscribe(">", stream=stream, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0))
    out: list[tuple[int, str, bytes, dict[str, str]]] = []
    try:
        while True:
            info = await sub.consumer_info()
            if not info.num_pending:
                break
            try:
                msgs = await sub.fetch(1000, timeout=2)
            except NatsTimeout:
                continue
            out += [(m.metadata.sequence.stream, m.subject, m.data, dict(m.headers or {})) for m in msgs]
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


async def _acked_floor(nc: NATS) -> int:
    """The router's timer consumer's ack floor: fired copies at or below it were handled."""
    try:
        info = await nc.jetstream().consumer_info(sj.TIMERS_STREAM, TIMERS_CONSUMER)
    except NotFoundError:
        return 0
    return int(info.ack_floor.stream_seq) if info.ack_floor else 0


async def _create_backup(nc: NATS, replicas: int, token: str) -> bool:
    """Create the backup stream, marked with ``token``: the lock of the migration (False: another has it)."""
    resp = await _api(nc, f"$JS.API.STREAM.CREATE.{BACKUP_STREAM}", {
        "name": BACKUP_STREAM, "description": token, "subjects": [f"{BACKUP_ROOT}.>"], "storage": "file",
        "retention": "limits", "num_replicas": replicas, "discard": "old"})
    err = resp.get("error")
    if err and err.get("err_code") == 10058:  # in use (with another description)
        return False
    if err:
        raise RuntimeError(f"stream {BACKUP_STREAM}: {err.get('description')}")
    return True


async def _copy_to_backup(nc: NATS) -> int:
    """Copy the timers still to handle from the old stream into the backup stream; returns how many."""
    floor = await _acked_floor(nc)
    js = nc.jetstream()
    n = 0
    for seq, subject, data, headers in await _read_all(nc, sj.TIMERS_STREAM):
        if "Nats-Schedule" in headers:  # a pending schedule (a fired one is gone from the stream)
            hdrs = {_SUBJECT: subject, _SCHEDULE: headers["Nats-Schedule"],
                    _TARGET: headers.get("Nats-Schedule-Target", "")}
        elif subject.startswith(sj.TIMER_FIRED[:-1]) and seq > floor:  # fired, maybe not handled yet
            hdrs = {_SUBJECT: subject}
        else:
            continue
        n += 1
        await js.publish(f"{BACKUP_ROOT}.{n}", data, headers=hdrs)
    return n


async def _replay(nc: NATS) -> int:
    js = nc.jetstream()
    n = 0
    for _, _, data, headers in await _read_all(nc, BACKUP_STREAM):
        hdrs: dict[str, str] = {}
        if headers.get(_SCHEDULE):
            hdrs = {"Nats-Schedule": headers[_SCHEDULE], "Nats-Schedule-Target": headers[_TARGET]}
        await js.publish(headers[_SUBJECT], data, headers=hdrs or None)
        n += 1
    return n


async def _stalled(nc: NATS, stall_s: float) -> bool:
    """Wait while another process migrates: False once its backup is gone (done), True when neither stream
    has moved for ``stall_s`` (it died: take over)."""
    last: tuple[Any, ...] | None = None
    quiet = 0.0
    while (backup := await stream_info(nc, BACKUP_STREAM)) is not None:
        timers = await stream_info(nc, sj.TIMERS_STREAM)
        mark = (backup["state"].get("last_seq"), backup["config"].get("description"),
                timers and timers["state"].get("last_seq"), timers and timers["config"].get("retention"))
        if mark != last:
            last, quiet = mark, 0.0
        elif quiet >= stall_s:
            return True
        await asyncio.sleep(0.25)
        quiet += 0.25
    return False


async def migrate_timers_stream(nc: NATS, config: dict[str, object], *, stall_s: float = 15.0) -> bool:
    """Recreate NEEDLE_TIMERS with ``config`` (work-queue retention) when it has another retention, keeping
    its pending timers; finish an interrupted migration. Several processes starting at once (``needle up``
    and its workers) do it once: the backup stream is the lock, the others wait for it to go, and take
    over when it stops moving for ``stall_s``. Returns True when this process migrated."""
    token = f"needle timers migration {uuid.uuid4().hex}"
    replicas = int(str(config.get("num_replicas", 1)))
    migrated = False
    while True:
        old = await stream_info(nc, sj.TIMERS_STREAM)
        backup = await stream_info(nc, BACKUP_STREAM)
        converted = old is not None and old["config"].get("retention") == config["retention"]
        if backup is None:
            if old is None or converted:
                return migrated
            if not await _create_backup(nc, replicas, token):
                continue  # another process has just started: wait for it
            copied = await _copy_to_backup(nc)
            await _delete_stream(nc, sj.TIMERS_STREAM)
            log.warning("NEEDLE_TIMERS: recreating with work-queue retention", timers_kept=copied,
                        old_messages=old["state"].get("messages"))
        elif backup["config"].get("description") != token:
            if not await _stalled(nc, stall_s):
                continue  # the other process finished
            if old is not None and not converted:  # its copy may be incomplete: start again
                await _delete_stream(nc, BACKUP_STREAM)
                continue
            resp = await _api(nc, f"$JS.API.STREAM.UPDATE.{BACKUP_STREAM}", {**backup["config"], "description": token})
            if resp.get("error"):
                continue
        if await stream_info(nc, sj.TIMERS_STREAM) is None:
            resp = await _api(nc, f"$JS.API.STREAM.CREATE.{sj.TIMERS_STREAM}", dict(config))
            if resp.get("error") and resp["error"].get("err_code") != 10058:
                raise RuntimeError(f"stream {sj.TIMERS_STREAM}: {resp['error'].get('description')}")
        replayed = await _replay(nc)
        await _delete_stream(nc, BACKUP_STREAM)
        log.warning("NEEDLE_TIMERS: migrated to work-queue retention", timers_replayed=replayed)
        migrated = True
