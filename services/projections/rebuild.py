"""``needle rebuild``: replay the stream into fresh ``__rebuild`` tables while the live ones
keep serving, then swap them in atomically.

This process reads the stream (``reader.StreamReader``); the replay (``replay.py``: decode, fold the
whole stream in memory with the pure model, COPY) runs in a child process when the database URL is
given, so reading and folding use two cores, or in this process otherwise.

The swap takes the writers' advisory lock (so the live worker is between batches), applies
whatever the live worker committed since the replay's end to the new tables, then drops the
old tables and renames the new ones, all in one transaction: readers see the old tables or
the new ones, never a mix. The live worker continues from the new checkpoint.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog
from nats.js.client import JetStreamContext

from shared.events import subjects as sj
from shared.privacy.issuekeys import IssueKeys

from .reader import StreamReader
from .replay import DEFERRED_INDEXES, MAX_ISSUES_IN_MEMORY, SUFFIX, ReplayInline, ReplayProcess, decode_all
from .schema import TABLE_NAMES, tables
from .worker import LOCK_KEY, ProjectionWriter, migrate

log = structlog.get_logger("needle.rebuild")
Progress = Callable[[int, int, float], None]  # (done seq, target seq, events/s)


async def _drop(conn: asyncpg.Connection, suffix: str) -> None:
    for name in TABLE_NAMES:
        await conn.execute(f"DROP TABLE IF EXISTS {name}{suffix} CASCADE")


async def stream_last_seq(js: JetStreamContext) -> int:
    info = await js.stream_info(sj.EVENTS_STREAM)
    return int(info.state.last_seq)


async def rebuild(pool: asyncpg.Pool, js: JetStreamContext, live: ProjectionWriter,
                  progress: Progress | None = None, *, database_url: str | None = None,
                  max_issues: int = MAX_ISSUES_IN_MEMORY, read_batch: int = 2000,
                  texts: IssueKeys | None = None) -> dict[str, Any]:
    """Replay everything into ``__rebuild`` tables and swap them in. Returns figures for the report.

    With ``database_url`` (the database of ``pool``) the replay runs in a child process while this one reads.
    ``texts``: the issues' data keys (default: the live writer's) to open the free text with."""
    texts = texts or live.texts
    replay = (ReplayProcess(database_url, live.org, live.tz, max_issues) if database_url
              else ReplayInline(pool, live.org, live.tz, max_issues))
    reader = StreamReader(js, read_batch)
    try:
        async def prepare() -> None:
            async with pool.acquire() as conn:
                await _drop(conn, SUFFIX)
            await migrate(pool, SUFFIX, defer=DEFERRED_INDEXES)

        await asyncio.gather(prepare(), replay.start())
        fresh = ProjectionWriter(live.org, live.tz, SUFFIX)
        target = await stream_last_seq(js)
        if texts is not None:  # after the target: every event up to it was sealed with a key made before it
            await replay.use_keys(await texts.all_keys())
        t0 = time.perf_counter()
        read_s = 0.0
        while reader.seq < target:
            t = time.perf_counter()
            raws = await reader.fetch(target)
            read_s += time.perf_counter() - t
            if not raws:
                if reader.seq == 0:
                    break
                continue
            await replay.fold(raws)
            if progress:
                progress(reader.seq, target, reader.seq / max(time.perf_counter() - t0, 1e-9))
        figures = await replay.finish(reader.seq)
        replay_s = time.perf_counter() - t0
        events, spills = int(figures.pop("events")), int(figures.pop("spills"))
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
            live_seq, _ = await live.checkpoint(conn) if await _exists(conn, "checkpoints") else (0, None)
            while reader.seq < live_seq:  # catch up with what the live worker committed meanwhile
                raws = await reader.fetch(live_seq)
                if raws:
                    envs = decode_all(raws)
                    if texts is not None:
                        envs = await texts.open(envs)
                    await fresh.write(conn, envs, reader.seq)
                    events += len(envs)
            await _swap(conn)
    finally:
        await replay.close()
        await reader.close()
    total = time.perf_counter() - t0
    return {"events": events, "seconds": round(total, 3), "events_per_s": round(events / max(replay_s, 1e-9), 1),
            "target_seq": target, "in_child_process": database_url is not None, "spills": spills,
            "split_s": {"read": round(read_s, 3)} | figures}


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
