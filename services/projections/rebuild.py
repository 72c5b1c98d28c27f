"""``needle rebuild``: replay the stream into fresh ``__rebuild`` tables while the live ones
keep serving, then swap them in atomically.

The swap takes the writers' advisory lock (so the live worker is between batches), applies
whatever the live worker committed since the replay's end to the new tables, then drops the
old tables and renames the new ones, all in one transaction: readers see the old tables or
the new ones, never a mix. The live worker continues from the new checkpoint.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from shared.events import subjects as sj
from shared.events.codec import Envelope, UnknownEventType, decode

from .schema import TABLE_NAMES, tables
from .worker import LOCK_KEY, ProjectionWriter, migrate

log = structlog.get_logger("needle.rebuild")
SUFFIX = "__rebuild"
Progress = Callable[[int, int, float], None]  # (done seq, target seq, events/s)


async def _drop(conn: asyncpg.Connection, suffix: str) -> None:
    for name in TABLE_NAMES:
        await conn.execute(f"DROP TABLE IF EXISTS {name}{suffix} CASCADE")


async def stream_last_seq(js: JetStreamContext) -> int:
    info = await js.stream_info(sj.EVENTS_STREAM)
    return int(info.state.last_seq)


class _Reader:
    """An ephemeral, unacknowledged pull consumer over the whole stream (the fastest way to read it)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.sub: Any = None
        self.seq = 0

    async def next_batch(self, upto: int, size: int = 2000) -> list[Envelope]:
        if self.sub is None:
            self.sub = await self.js.pull_subscribe(
                sj.ALL_EVENTS, stream=sj.EVENTS_STREAM,
                config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                                      inactive_threshold=60, max_waiting=1))
        out: list[Envelope] = []
        while self.seq < upto and len(out) < size:
            try:
                msgs = await self.sub.fetch(min(size, upto - self.seq), timeout=2)
            except Exception as exc:
                if "Timeout" in type(exc).__name__:
                    break
                raise
            for m in msgs:
                s = m.metadata.sequence.stream
                self.seq = max(self.seq, s)
                if s > upto or not m.subject.startswith(f"{sj.EVENTS_ROOT}.issue."):
                    continue
                try:
                    out.append(decode(m.data, s))
                except (UnknownEventType, ValueError) as exc:
                    log.error("event skipped by rebuild", seq=s, error=str(exc))
        return out

    async def close(self) -> None:
        if self.sub is not None:
            try:
                await self.sub.unsubscribe()
            except Exception:  # the ephemeral consumer expires by itself
                pass


async def rebuild(pool: asyncpg.Pool, js: JetStreamContext, live: ProjectionWriter,
                  progress: Progress | None = None) -> dict[str, float]:
    """Replay everything into ``__rebuild`` tables and swap them in. Returns figures for the report."""
    async with pool.acquire() as conn:
        await _drop(conn, SUFFIX)
    await migrate(pool, SUFFIX)
    fresh = ProjectionWriter(live.org, live.tz, SUFFIX)
    target = await stream_last_seq(js)
    reader = _Reader(js)
    t0 = time.perf_counter()
    events = 0
    try:
        while reader.seq < target:
            envs = await reader.next_batch(target)
            if not envs and reader.seq < target:
                if reader.seq == 0:
                    break
                continue
            async with pool.acquire() as conn, conn.transaction():
                await fresh.write(conn, envs, reader.seq)
            events += len(envs)
            if progress:
                progress(reader.seq, target, events / max(time.perf_counter() - t0, 1e-9))
        replay_s = time.perf_counter() - t0
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
            live_seq, _ = await live.checkpoint(conn) if await _exists(conn, "checkpoints") else (0, None)
            while reader.seq < live_seq:  # catch up with what the live worker committed meanwhile
                envs = await reader.next_batch(live_seq)
                if not envs and reader.seq < live_seq:
                    continue
                await fresh.write(conn, envs, reader.seq)
                events += len(envs)
            await _swap(conn)
    finally:
        await reader.close()
    total = time.perf_counter() - t0
    return {"events": events, "seconds": round(total, 3), "events_per_s": round(events / max(replay_s, 1e-9), 1),
            "target_seq": target}


async def _exists(conn: asyncpg.Connection, table: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table))


async def _swap(conn: asyncpg.Connection) -> None:
    _, live_tables = tables("")
    _, new_tables = tables(SUFFIX)
    await _drop(conn, "")
    for name in TABLE_NAMES:
        await conn.execute(f"ALTER TABLE {name}{SUFFIX} RENAME TO {name}")
        new_t, live_t = new_tables[name], live_tables[name]
        for new_ix, live_ix in zip(sorted(new_t.indexes, key=lambda i: str(i.name)),
                                   sorted(live_t.indexes, key=lambda i: str(i.name)), strict=True):
            await conn.execute(f"ALTER INDEX {new_ix.name} RENAME TO {live_ix.name}")
        await conn.execute(f"ALTER INDEX IF EXISTS {name}{SUFFIX}_pkey RENAME TO {name}_pkey")
