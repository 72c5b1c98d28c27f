"""The projection worker: one durable JetStream consumer, one writer, exactly once.

Each batch: fetch up to ``batch`` events, skip those at or below the checkpoint, load the
rows they touch, fold them in memory (``model.apply``), then in ONE transaction upsert the
rows, add the counter deltas, append the audit rows and move the checkpoint; ack only after
the commit. A crash anywhere re-delivers events the checkpoint already covers (skipped) or
events not yet committed (applied once). A Postgres outage holds the batch and retries.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import orjson
import structlog
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from shared.config import OrgTree
from shared.domain.errors import Unavailable
from shared.events import subjects as sj
from shared.events.codec import Envelope, UnknownEventType, decode
from shared.privacy.issuekeys import IssueKeys
from shared.privacy.texts import ERASED

from .follower import CHANNEL
from .model import Batch, apply, visits_named
from .progress import Progress
from .schema import ISSUE_COLUMNS, PROJECTION, PROJECTION_VERSION, TASK_COLUMNS, VISIT_COLUMNS, ddl

log = structlog.get_logger("needle.projections")
RECREATE_AFTER_FAILURES = 12  # fetch errors in a row (~6 s) before the consumer is recreated
PROJECTED = (f"{sj.EVENTS_ROOT}.issue.", f"{sj.EVENTS_ROOT}.visit.")  # the subject families folded here
LOCK_KEY = 7_311_001  # advisory lock: one writer per read-model set (the worker, or a rebuild swap)


def _upsert(table: str, cols: list[str], key: str) -> str:
    names = ", ".join(cols)
    params = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c != key)
    return f"INSERT INTO {table} ({names}) VALUES ({params}) ON CONFLICT ({key}) DO UPDATE SET {updates}"


STATS_COLUMNS = ["day", "scope", "key", "metric", "n"]
AUDIT_COLUMNS = ["seq", "issue_id", "type", "actor", "at", "summary"]


def _insert_json(table: str, cols: list[str], param: str) -> str:
    """INSERT the rows of a JSON array of objects (``_json``), typed by the table's own row type."""
    names = ", ".join(cols)
    return f"INSERT INTO {table} ({names}) SELECT {names} FROM jsonb_populate_recordset(NULL::{table}, {param}::jsonb)"


def _upsert_json(table: str, cols: list[str], key: str, param: str) -> str:
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c != key)
    return f"{_insert_json(table, cols, param)} ON CONFLICT ({key}) DO UPDATE SET {updates}"


def _json(cols: list[str], rows: list[tuple[Any, ...]]) -> str:
    """Rows as a JSON array of objects (column names are SQLAlchemy's quoted_name, a str subclass: NON_STR_KEYS);
    datetimes to the microsecond with their offset (naive ones as UTC, as asyncpg's timestamptz codec takes them)."""
    opts = orjson.OPT_NAIVE_UTC | orjson.OPT_NON_STR_KEYS
    return orjson.dumps([dict(zip(cols, r, strict=True)) for r in rows], option=opts).decode()


def _row(r: dict[str, Any], cols: list[str]) -> tuple[Any, ...]:
    """A row as the upsert's parameters; lists copied, so a snapshot does not follow in-place changes."""
    return tuple(list(v) if isinstance(v, list) else v for v in (r[c] for c in cols))


async def migrate(pool: asyncpg.Pool, suffix: str = "", defer: tuple[str, ...] = ()) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY + 1)
        for stmt in ddl(suffix, defer):
            await conn.execute(stmt)


class ProjectionWriter:
    """Writes folded batches into one set of tables (live, or ``__rebuild``)."""

    def __init__(self, org: OrgTree, tz: Any, suffix: str = "", texts: IssueKeys | None = None) -> None:
        self.org, self.tz, self.suffix = org, tz, suffix
        self.texts = texts  # the issues' data keys: a rebuild of these tables opens the free text with them
        s = suffix
        self.sql_issue = _upsert(f"issues{s}", ISSUE_COLUMNS, "id")
        self.sql_task = _upsert(f"tasks{s}", TASK_COLUMNS, "id")
        self.sql_visit = _upsert(f"visits{s}", VISIT_COLUMNS, "id")
        self.sql_stats = (f"INSERT INTO stats_daily{s} (day, scope, key, metric, n) VALUES ($1, $2, $3, $4, $5) "
                          f"ON CONFLICT (scope, key, day, metric) DO UPDATE SET n = stats_daily{s}.n + EXCLUDED.n")
        self.sql_checkpoint = (f"INSERT INTO checkpoints{s} (projection, seq, version) VALUES ($1, $2, $3) "
                               f"ON CONFLICT (projection) DO UPDATE SET seq = EXCLUDED.seq, version = EXCLUDED.version")
        if not s:  # the live tables: tell the followers (delivered at the commit, in the same round trip)
            self.sql_checkpoint = (f"WITH c AS ({self.sql_checkpoint} RETURNING seq) "
                                   f"SELECT pg_notify('{CHANNEL}', seq::text) FROM c")
        # a batch's rows, counters, audit and checkpoint in ONE statement (one round trip instead of an
        # executemany per table, a COPY and the checkpoint: each one a wait for the CPU on a busy machine)
        self.sql_batch = (
            f"WITH i AS ({_upsert_json(f'issues{s}', ISSUE_COLUMNS, 'id', '$1')}), "
            f"t AS ({_upsert_json(f'tasks{s}', TASK_COLUMNS, 'id', '$2')}), "
            f"st AS ({_insert_json(f'stats_daily{s}', STATS_COLUMNS, '$3')} ON CONFLICT (scope, key, day, metric) "
            f"DO UPDATE SET n = stats_daily{s}.n + EXCLUDED.n), "
            f"a AS ({_insert_json(f'audit{s}', AUDIT_COLUMNS, '$4')}), "
            f"v AS ({_upsert_json(f'visits{s}', VISIT_COLUMNS, 'id', '$8')}), "
            f"c AS (INSERT INTO checkpoints{s} (projection, seq, version) VALUES ($5, $6, $7) ON CONFLICT (projection) "
            f"DO UPDATE SET seq = EXCLUDED.seq, version = EXCLUDED.version RETURNING seq) "
            + (f"SELECT pg_notify('{CHANNEL}', seq::text) FROM c" if not s else "SELECT seq FROM c"))

    async def checkpoint(self, conn: asyncpg.Connection) -> tuple[int, int | None]:
        row = await conn.fetchrow(f"SELECT seq, version FROM checkpoints{self.suffix} WHERE projection = $1",
                                  PROJECTION)
        return (int(row["seq"]), int(row["version"])) if row else (0, None)

    async def write(self, conn: asyncpg.Connection, envs: list[Envelope], last_seq: int) -> int:
        """Apply ``envs`` (those above the checkpoint) and move the checkpoint to ``last_seq``, in the
        caller's transaction. Returns how many events were applied."""
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        done, _ = await self.checkpoint(conn)
        fresh = [e for e in envs if e.seq > done]
        if fresh:
            batch = Batch(org=self.org, tz=self.tz)
            ids = list({e.subject for e in fresh})
            s = self.suffix
            vids = list(visits_named(fresh))
            batch.load([dict(r) for r in await conn.fetch(f"SELECT * FROM issues{s} WHERE id = ANY($1)", ids)],
                       [dict(r) for r in await conn.fetch(f"SELECT * FROM tasks{s} WHERE issue_id = ANY($1)", ids)],
                       [dict(r) for r in await conn.fetch(f"SELECT * FROM visits{s} WHERE id = ANY($1)", vids)]
                       if vids else [])
            # rows as stored, to write back only those the batch changed (or created): every task of every
            # touched issue used to be upserted again, most of them unchanged
            stored_issues = {i: _row(r, ISSUE_COLUMNS) for i, r in batch.issues.items()}
            stored_tasks = {t: _row(r, TASK_COLUMNS) for t, r in batch.tasks.items()}
            stored_visits = {v: _row(r, VISIT_COLUMNS) for v, r in batch.visits.items()}
            for env in fresh:
                apply(batch, env)
            issues = [row for i, r in batch.issues.items()
                      if (row := _row(r, ISSUE_COLUMNS)) != stored_issues.get(i)]
            tasks = [row for t, r in batch.tasks.items() if (row := _row(r, TASK_COLUMNS)) != stored_tasks.get(t)]
            visits = [row for v, r in batch.visits.items()
                      if (row := _row(r, VISIT_COLUMNS)) != stored_visits.get(v)]
            stats = [(*k, n) for k, n in batch.stats.items() if n]
            await conn.execute(self.sql_batch, _json(ISSUE_COLUMNS, issues), _json(TASK_COLUMNS, tasks),
                               _json(STATS_COLUMNS, stats), _json(AUDIT_COLUMNS, batch.audit),
                               PROJECTION, max(last_seq, done), PROJECTION_VERSION, _json(VISIT_COLUMNS, visits))
            if batch.shredded:  # the audit lines that quoted the shredded text (a report's title, a return's reason)
                await conn.executemany(
                    f"UPDATE audit{s} SET summary = regexp_replace(summary, ': .*$', ': {ERASED}', 's') "
                    "WHERE issue_id = $1 AND seq < $2 AND type IN ('issue_reported', 'task_returned')",
                    list(batch.shredded.items()))
        elif last_seq > done:
            await conn.execute(self.sql_checkpoint, PROJECTION, last_seq, PROJECTION_VERSION)
        return len(fresh)


class ProjectionWorker(Progress):
    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, writer: ProjectionWriter, *,
                 durable: str = "projections", batch: int = 1000, health: dict[str, bool] | None = None,
                 texts: IssueKeys | None = None) -> None:
        super().__init__()  # seq: the checkpoint as last committed by this worker
        self.pool, self.js, self.writer = pool, js, writer
        self.texts = texts  # the issues' data keys: the read models hold the free text opened (or erased)
        self.durable, self.batch = durable, batch
        self.applied = 0
        self.health = health if health is not None else {}

    async def _opened(self, envs: list[Envelope]) -> list[Envelope]:
        """The batch with its free text opened; while the keys do not answer, the batch waits (never skipped)."""
        assert self.texts is not None
        delay = 0.2
        while True:
            try:
                return await self.texts.open(envs)
            except Unavailable as exc:
                self.health["projections"] = False
                log.warning("issue keys unavailable; the batch waits", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def subscribe(self, start_seq: int) -> Any:
        """(Re)create the durable consumer to start right after the Postgres checkpoint, which is the
        truth: whatever a dead predecessor had fetched and not committed is delivered again, in order."""
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(sj.EVENTS_STREAM, self.durable)
        return await self.js.pull_subscribe(
            sj.ALL_EVENTS, durable=self.durable, stream=sj.EVENTS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.ALL, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                  opt_start_seq=start_seq, ack_wait=120, max_ack_pending=50_000, max_deliver=-1))

    async def _checkpoint(self) -> int:
        while True:
            try:
                async with self.pool.acquire() as conn:
                    seq, _ = await self.writer.checkpoint(conn)
                return seq
            except Exception as exc:  # Postgres not up yet: wait for it
                self.health["postgres"] = False
                log.warning("cannot read the checkpoint; retrying", error=repr(exc))
                await asyncio.sleep(1.0)

    async def run(self, on_subscribed: Any = None) -> None:
        self.seq = await self._checkpoint()
        sub = await self._resubscribe(on_subscribed)  # a cluster still electing its leaders: wait, as later
        suspect_gap_at = 0
        failures = 0
        while True:
            try:
                msgs: list[Msg] = await self.fetch(sub)
                failures = self._fetch_recovered(failures)
            except Exception as exc:
                if "Timeout" in type(exc).__name__:
                    failures = self._fetch_recovered(failures)
                    continue
                failures += 1
                log.warning("fetch failed", error=repr(exc), failures=failures)
                await asyncio.sleep(0.5)
                if failures < 3:
                    continue
                self.health["projections"] = False
                # the consumer is gone (deleted, stream restored...): recreate it. One that still exists is
                # electing a leader (a node died, ~5 s in a cluster): deleting it then would fail; wait
                if failures >= RECREATE_AFTER_FAILURES or not await self._consumer_exists():
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    sub = await self._resubscribe(on_subscribed)
                    failures = 0
                continue
            msgs = [m for m in msgs if m.metadata.sequence.stream > self.seq]  # redeliveries already committed
            if not msgs:
                continue
            seqs = [m.metadata.sequence.stream for m in msgs]
            contiguous = seqs[0] == self.seq + 1 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            if not contiguous and suspect_gap_at != seqs[0]:
                # the consumer runs ahead of the checkpoint (messages still pending elsewhere): restart it
                # at the checkpoint, so nothing is ever skipped. The stream has no holes (deny_delete), so a
                # gap seen twice at the same place is real (retention) and is accepted.
                log.warning("gap before the batch; restarting the consumer at the checkpoint",
                            checkpoint=self.seq, first=seqs[0])
                suspect_gap_at = seqs[0]
                await sub.unsubscribe()
                self.seq = max(self.seq, await self._checkpoint())
                sub = await self.subscribe(self.seq + 1)
                if on_subscribed is not None:
                    on_subscribed(sub)
                continue
            await self.commit(msgs)

    async def fetch(self, sub: Any) -> list[Msg]:
        """The next messages, as soon as there is one. nats-py's ``fetch(n)``, when nothing is waiting, holds a
        pull request open and returns only once ``n`` messages came or its timeout ran out: a quiet stream's
        event waited up to the whole timeout (0.5 s) to be projected. So: wait for one, then take at once those
        the consumer says are pending behind it (they are there: that fetch does not linger)."""
        msgs: list[Msg] = await sub.fetch(1, timeout=0.5)
        pending = msgs[-1].metadata.num_pending if msgs else 0
        if pending and self.batch > 1:
            try:
                msgs += await sub.fetch(min(self.batch - 1, pending), timeout=0.5)
            except Exception as exc:  # the first one goes on alone; the next fetch sees what this one could not
                log.debug("fetch of the pending messages failed", error=repr(exc))
        return msgs

    def _fetch_recovered(self, failures: int) -> int:
        if failures >= 3:  # health went red over the fetch errors: the consumer answers again
            self.health["projections"] = True
        return 0

    async def _consumer_exists(self) -> bool:
        try:
            await self.js.consumer_info(sj.EVENTS_STREAM, self.durable, timeout=2)
        except NotFoundError:
            return False
        except Exception:  # no answer: JetStream is busy electing; the consumer is presumably there
            return True
        return True

    async def _resubscribe(self, on_subscribed: Any) -> Any:
        """(Re)create the consumer at the checkpoint, retrying until it works. (It used to go back to
        fetching on the subscription it had just unsubscribed when one attempt failed: every fetch
        then timed out, silently, forever — found by the fault suite when a node that led the
        consumer was killed: the read models stopped at the checkpoint of that moment.)"""
        delay = 0.5
        while True:
            try:
                self.seq = max(self.seq, await self._checkpoint())
                sub = await self.subscribe(self.seq + 1)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.health["projections"] = False
                log.warning("cannot create the consumer yet", error=repr(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if on_subscribed is not None:
                on_subscribed(sub)
            self.health["projections"] = True
            return sub

    async def commit(self, msgs: list[Msg]) -> None:
        envs: list[Envelope] = []
        for m in msgs:
            if not m.subject.startswith(PROJECTED):
                continue
            try:
                env = decode(m.data, m.metadata.sequence.stream)
            except (UnknownEventType, ValueError) as exc:  # written by a newer needle: skip, loudly
                log.error("event skipped by projections", subject=m.subject, error=str(exc))
                continue
            envs.append(env)
            log.debug("projecting", issue=env.subject, trace_id=env.correlationid, seq=env.seq, type=env.type)
        last = msgs[-1].metadata.sequence.stream
        if self.texts is not None:
            envs = await self._opened(envs)
        delay = 0.2
        while True:  # hold the batch until it is committed: never ack, never move on without it
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    self.applied += await self.writer.write(conn, envs, last)
                self.health["postgres"] = True
                self.health["projections"] = True
                break
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                    asyncpg.exceptions.CannotConnectNowError) as exc:
                self.health["postgres"] = False
                log.warning("postgres unavailable; holding the batch", error=repr(exc), retry_in=delay)
            except Exception as exc:  # a cancelled statement, a driver hiccup...: retry, health turns red
                self.health["projections"] = False
                log.exception("batch failed; holding and retrying it", error=repr(exc), retry_in=delay,
                              first=msgs[0].metadata.sequence.stream, last=last)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        await msgs[-1].ack()  # AckPolicy.ALL: acks the whole batch, after the commit
        await self.advance(last)


