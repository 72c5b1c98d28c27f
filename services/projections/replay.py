"""The replay of ``needle rebuild``: the stream folded in memory with the pure model, written with COPY.

One ``Batch`` lives for the whole replay (``model.apply`` over every event); audit rows are COPYed out in chunks
while the replay goes on; issue, task and counter rows are COPYed at the end into the fresh ``__rebuild`` tables.
Past ``max_issues`` issues in memory the rows are spilled (the live worker's upserts, counters added) and the
rows of a spilled issue are loaded back when one of its events comes, as the live worker does per batch.

Reading the stream costs the reading process most of a core (nats-py builds objects and tasks per message), so
the replay can run in a child process (``ReplayProcess``): one core reads, the other decodes, folds and COPYs.
``ReplayInline`` runs the same ``Replay`` in the caller's process (no database URL at hand, or a test)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import multiprocessing
import threading
import time
from collections import deque
from typing import Any

import asyncpg
import structlog

from shared.config import OrgTree
from shared.events import subjects as sj
from shared.events.codec import Envelope, UnknownEventType, decode
from shared.privacy.issuekeys import IssueKey, open_with

from .model import Batch, apply, visits_named
from .reader import Raw
from .schema import ISSUE_COLUMNS, PROJECTION, PROJECTION_VERSION, TASK_COLUMNS, VISIT_COLUMNS, index_ddl
from .worker import ProjectionWriter

log = structlog.get_logger("needle.rebuild")
SUFFIX = "__rebuild"
MAX_ISSUES_IN_MEMORY = 100_000  # ~330 MB of rows before a spill (measured: 3.3 KB per issue with its tasks)
AUDIT_CHUNK = 20_000
AUDIT_COLUMNS = ["seq", "issue_id", "type", "actor", "at", "summary"]
STATS_COLUMNS = ["day", "scope", "key", "metric", "n"]
ISSUE_PREFIX = (f"{sj.EVENTS_ROOT}.issue.", f"{sj.EVENTS_ROOT}.visit.")  # what the read models fold
DEFERRED_INDEXES = ("issues", "tasks")  # built after their rows are COPYed (or before a spill's upserts need them)


def decode_all(raws: list[Raw], keys: dict[str, IssueKey] | None = None) -> list[Envelope]:
    """The events the read models fold; with ``keys`` (every issue's data key, taken once the replay's end was
    fixed: an event up to it was sealed with a key made before it) their free text is opened, or erased where
    the issue has no key any more."""
    out: list[Envelope] = []
    for seq, subject, data in raws:
        if not subject.startswith(ISSUE_PREFIX):
            continue
        try:
            env = decode(data, seq)
        except (UnknownEventType, ValueError) as exc:
            log.error("event skipped by rebuild", seq=seq, error=str(exc))
            continue
        out.append(env if keys is None or env.sealed is None else open_with(env, keys.get(env.subject)))
    return out


class AuditCopier:
    """COPYs chunks of audit rows on its own connection while the replay goes on (Postgres works in its own
    process meanwhile). Bounded: at most ``depth`` chunks wait."""

    def __init__(self, pool: asyncpg.Pool, depth: int = 2) -> None:
        self.pool = pool
        self.queue: asyncio.Queue[list[Any] | None] = asyncio.Queue(depth)
        self.task = asyncio.create_task(self._run())
        self.waited = 0.0  # seconds the replay waited for Postgres

    async def _run(self) -> None:
        async with self.pool.acquire() as conn:
            while (chunk := await self.queue.get()) is not None:
                await conn.copy_records_to_table(f"audit{SUFFIX}", records=chunk, columns=AUDIT_COLUMNS)

    async def put(self, chunk: list[Any]) -> None:
        if self.task.done():
            await self.task  # raises what stopped it
        t = time.perf_counter()
        await self.queue.put(chunk)
        self.waited += time.perf_counter() - t

    async def close(self) -> None:
        t = time.perf_counter()
        if not self.task.done():
            await self.queue.put(None)
        await self.task
        self.waited += time.perf_counter() - t


class Replay:
    def __init__(self, pool: asyncpg.Pool, org: OrgTree, tz: Any, max_issues: int) -> None:
        self.pool, self.max_issues = pool, max_issues
        self.writer = ProjectionWriter(org, tz, SUFFIX)
        self.batch = Batch(org=org, tz=tz)
        self.spills = 0
        self.events = 0
        self.fold_s = 0.0
        self.audit = AuditCopier(pool)
        self.keys: dict[str, IssueKey] | None = None

    async def fold(self, raws: list[Raw]) -> None:
        t = time.perf_counter()
        envs = decode_all(raws, self.keys)
        b = self.batch
        if self.spills and (ids := list({e.subject for e in envs} - b.issues.keys())):
            vids = list(visits_named(envs) - b.visits.keys())
            async with self.pool.acquire() as conn:
                b.load([dict(r) for r in await conn.fetch(f"SELECT * FROM issues{SUFFIX} WHERE id = ANY($1)", ids)],
                       [dict(r) for r in await conn.fetch(f"SELECT * FROM tasks{SUFFIX} WHERE issue_id = ANY($1)",
                                                          ids)],
                       [dict(r) for r in await conn.fetch(f"SELECT * FROM visits{SUFFIX} WHERE id = ANY($1)",
                                                          vids)])
        for env in envs:
            apply(b, env)
        self.events += len(envs)
        gc.freeze()  # the rows live until the end: keep the collector from walking them again and again
        if len(b.audit) >= AUDIT_CHUNK:
            await self.audit.put(b.audit)
            b.audit = []
        if len(b.issues) >= self.max_issues:
            await self.write_rows()
            self.batch = Batch(org=b.org, tz=b.tz, audit=b.audit)
            self.spills += 1
        self.fold_s += time.perf_counter() - t

    async def write_rows(self) -> None:
        b, w = self.batch, self.writer
        issues = [tuple(r[c] for c in ISSUE_COLUMNS) for r in b.issues.values()]
        tasks = [tuple(r[c] for c in TASK_COLUMNS) for r in b.tasks.values()]
        visits = [tuple(r[c] for c in VISIT_COLUMNS) for r in b.visits.values()]
        stats = [(*k, n) for k, n in b.stats.items() if n]
        async with self.pool.acquire() as conn, conn.transaction():
            if not self.spills:  # the rows of the stream, or of the first spill, into empty tables: then indexes
                await conn.copy_records_to_table(f"issues{SUFFIX}", records=issues, columns=ISSUE_COLUMNS)
                await conn.copy_records_to_table(f"tasks{SUFFIX}", records=tasks, columns=TASK_COLUMNS)
                await conn.copy_records_to_table(f"stats_daily{SUFFIX}", records=stats, columns=STATS_COLUMNS)
                await conn.copy_records_to_table(f"visits{SUFFIX}", records=visits, columns=VISIT_COLUMNS)
                for stmt in index_ddl(SUFFIX, DEFERRED_INDEXES):
                    await conn.execute(stmt)
            else:  # some rows are there already: the live worker's upserts
                await conn.executemany(w.sql_issue, issues)
                await conn.executemany(w.sql_task, tasks)
                await conn.executemany(w.sql_stats, stats)
                await conn.executemany(w.sql_visit, visits)

    async def finish(self, last_seq: int) -> dict[str, Any]:
        """Write what is left and the checkpoint ``last_seq``; figures for the report."""
        t = time.perf_counter()
        if self.batch.audit:
            await self.audit.put(self.batch.audit)
            self.batch.audit = []
        await self.audit.close()
        await self.write_rows()
        await self.pool.execute(self.writer.sql_checkpoint, PROJECTION, last_seq, PROJECTION_VERSION)
        async with self.pool.acquire() as conn:  # statistics for the planner's first plans on these tables
            for name in ("issues", "tasks", "stats_daily"):
                await conn.execute(f"ANALYZE {name}{SUFFIX}")
        return {"events": self.events, "spills": self.spills, "decode_fold_s": round(self.fold_s, 3),
                "waited_for_audit_copy_s": round(self.audit.waited, 3),
                "finish_copy_s": round(time.perf_counter() - t, 3)}

    def cancel(self) -> None:
        self.audit.task.cancel()


class ReplayInline:
    """The replay in this process and on this event loop."""

    def __init__(self, pool: asyncpg.Pool, org: OrgTree, tz: Any, max_issues: int = MAX_ISSUES_IN_MEMORY) -> None:
        self.pool, self.org, self.tz, self.max_issues = pool, org, tz, max_issues
        self.replay: Replay | None = None

    async def start(self) -> None:
        self.replay = Replay(self.pool, self.org, self.tz, self.max_issues)

    async def use_keys(self, keys: dict[str, IssueKey]) -> None:
        assert self.replay is not None
        self.replay.keys = keys

    async def fold(self, raws: list[Raw]) -> None:
        assert self.replay is not None
        await self.replay.fold(raws)

    async def finish(self, last_seq: int) -> dict[str, Any]:
        assert self.replay is not None
        try:
            return await self.replay.finish(last_seq)
        finally:
            gc.unfreeze()

    async def close(self) -> None:
        if self.replay is not None:
            self.replay.cancel()
        gc.unfreeze()


# -- the replay in a child process ----------------------------------------------------------------------------------
class _Child:
    """The child's side: an event loop in a thread runs the ``Replay``; each call waits for its coroutine."""

    loop: asyncio.AbstractEventLoop
    replay: Replay
    pool: asyncpg.Pool

    @classmethod
    def init(cls, dsn: str, org: OrgTree, tz: Any, max_issues: int) -> None:
        cls.loop = asyncio.new_event_loop()
        threading.Thread(target=cls.loop.run_forever, name="replay-loop", daemon=True).start()
        cls.call(cls._open(dsn, org, tz, max_issues))

    @classmethod
    async def _open(cls, dsn: str, org: OrgTree, tz: Any, max_issues: int) -> None:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3,
                                         server_settings={"plan_cache_mode": "force_custom_plan"})
        assert pool is not None
        cls.pool = pool
        cls.replay = Replay(pool, org, tz, max_issues)

    @classmethod
    def call(cls, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, cls.loop).result()


def _child_ready() -> bool:
    return True


def _child_keys(keys: dict[str, IssueKey]) -> None:
    _Child.replay.keys = keys


def _child_fold(raws: list[Raw]) -> None:
    _Child.call(_Child.replay.fold(raws))


def _child_finish(last_seq: int) -> dict[str, Any]:
    try:
        return dict(_Child.call(_Child.replay.finish(last_seq)))
    finally:
        _Child.call(_Child.pool.close())


class ReplayProcess:
    """The replay in a child process (spawned: nothing of this process's loop or connections is inherited), fed
    batches of raw events, at most ``window`` of them in flight."""

    def __init__(self, dsn: str, org: OrgTree, tz: Any, max_issues: int = MAX_ISSUES_IN_MEMORY,
                 window: int = 3) -> None:
        self.window = window
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_Child.init,
            initargs=(dsn.replace("postgresql+asyncpg://", "postgresql://"), org, tz, max_issues))

    def _submit(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def start(self) -> None:
        await self._submit(_child_ready)  # the child is up and connected (its start overlaps nothing else)

    async def use_keys(self, keys: dict[str, IssueKey]) -> None:
        await self._submit(_child_keys, keys)

    async def fold(self, raws: list[Raw]) -> None:
        self.pending.append(self._submit(_child_fold, raws))
        while len(self.pending) >= self.window or (self.pending and self.pending[0].done()):
            await self.pending.popleft()

    async def finish(self, last_seq: int) -> dict[str, Any]:
        while self.pending:
            await self.pending.popleft()
        return dict(await self._submit(_child_finish, last_seq))

    async def close(self) -> None:
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
