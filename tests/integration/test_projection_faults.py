"""The projection worker under faults: exactly once through SIGKILLs, and recovery from a Postgres restart.

* ``needle run projections`` as a subprocess, SIGKILLed while it holds a batch and restarted, during a load
  appended straight into NEEDLE_EVENTS: the read models end with exact counts (nothing twice, nothing missed).
* A dedicated Postgres stopped and started again on the same port while events keep coming: the in-process
  worker holds its batch, resumes by itself, the counts are exact and ``/healthz`` answers 200 again.
* Deterministic reductions of what those found: a worker dying between fetch and commit, and a batch whose
  statement is cancelled.

The quick variants (2,000 events) run by default; the 10,000-event soak is ``-m slow``.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.entrypoints.embedded import EmbeddedPostgres
from services.entrypoints.processes import spawn
from services.projections.migrate import upgrade
from services.projections.service import open_pool
from services.projections.worker import LOCK_KEY, ProjectionWorker, ProjectionWriter
from shared.config import load_org, load_rulebook
from shared.domain.ids import new_issue_id, task_id
from shared.events import models as ev
from shared.events import subjects as sj
from shared.store.eventstore import JetStreamEventStore
from shared.store.streams import ensure_streams
from tests.support import NeedleHandle, ensure_database, start_needle

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ORG, RULES = FIXTURES / "contract_org.yaml", FIXTURES / "contract_rules.yaml"
NEEDLE = str(Path(sys.executable).parent / "needle")
BJ = ZoneInfo("Asia/Shanghai")
T0 = datetime(2025, 3, 4, 10, 0, tzinfo=BJ).astimezone(UTC)
EVENTS_PER_ISSUE = 4  # reported, routed + lead dispatched (one atomic append), acknowledged on time
_numbers = itertools.count(1)


# -- the load: issues appended straight into the stream -----------------------------------------------------------
@dataclass
class Load:
    store: JetStreamEventStore
    issues: int
    seconds: float  # spread the appends over about this long
    appended: int = 0  # issues fully appended so far
    ids: list[str] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # cleared: the load pauses between chunks

    def __post_init__(self) -> None:
        self.gate.set()

    async def one(self, n: int) -> None:
        issue = new_issue_id(int(T0.timestamp() * 1000) + n, next(_numbers))
        at = T0 + timedelta(seconds=n)
        grid = ("wuxing-g1", "wuxing-g2")[n % 2]
        first = await self.store.append(issue, [ev.IssueReported(grid=grid, category="road_damage", title=f"#{n}",
                                                                 reporter="gw", reported_at=at)],
                                        expected_last_seq=0, version=0, now=at, actor="gw")
        lead = task_id(issue, 1)
        routed = [ev.IssueRouted(level="district", owner_area="dinghai", reason="reported", rule="r",
                                 rulebook_version="v", caused_by=first.seq),
                  ev.TaskDispatched(task_id=lead, department="dinghai-roads", role="lead", level="district",
                                    clock="natural", dispatched_at=at, acknowledge_due=at + timedelta(minutes=30),
                                    resolve_due=at + timedelta(hours=24), acknowledge_warn=at + timedelta(minutes=24),
                                    resolve_warn=at + timedelta(hours=19), caused_by=first.seq)]
        second = await self.store.append(issue, routed, expected_last_seq=first.seq, version=1, now=at,
                                         actor="router")
        ack_at = at + timedelta(minutes=5)
        await self.store.append(issue, [ev.TaskAcknowledged(task_id=lead, by="h", at=ack_at)],
                                expected_last_seq=second.seq, version=3, now=ack_at, actor="h")
        self.ids.append(issue)

    async def reached(self, issues: int, timeout: float = 120.0) -> None:
        assert await until(lambda: self.appended >= issues, timeout), f"{self.appended} of {issues} issues appended"

    async def run(self, chunk: int = 25) -> None:
        t0 = time.monotonic()
        for start in range(0, self.issues, chunk):
            await self.gate.wait()
            await asyncio.gather(*(self.one(n) for n in range(start, min(start + chunk, self.issues))))
            self.appended = min(start + chunk, self.issues)
            ahead = t0 + self.seconds * self.appended / self.issues - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)


async def until(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return predicate()


async def cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
    if task is not None:
        with contextlib.suppress(BaseException):
            await task


async def connect(url: str) -> tuple[NATS, JetStreamEventStore]:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    await ensure_streams(nc)
    store = JetStreamEventStore(nc)
    await store.start()
    return nc, store


async def stream_last_seq(nc: NATS) -> int:
    return int((await nc.jetstream().stream_info(sj.EVENTS_STREAM)).state.last_seq)


async def read_models(db_url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(db_url)
    try:
        return {
            "issues": await conn.fetchval("SELECT count(*) FROM issues"),
            "in_progress": await conn.fetchval("SELECT count(*) FROM issues WHERE status = 'in_progress' "
                                               "AND version = $1", EVENTS_PER_ISSUE),
            "tasks": await conn.fetchval("SELECT count(*) FROM tasks"),
            "acknowledged": await conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'acknowledged'"),
            "audit": await conn.fetchval("SELECT count(*) FROM audit"),
            "audit_distinct": await conn.fetchval("SELECT count(DISTINCT seq) FROM audit"),
            "stats": {r["metric"]: int(r["n"]) for r in await conn.fetch(
                "SELECT metric, sum(n) AS n FROM stats_daily WHERE scope = 'area' AND key = 'city' GROUP BY metric")},
            "dept": {r["metric"]: int(r["n"]) for r in await conn.fetch(
                "SELECT metric, sum(n) AS n FROM stats_daily WHERE scope = 'dept' AND key = 'dinghai-roads' "
                "GROUP BY metric")},
            "checkpoint": await conn.fetchval("SELECT seq FROM checkpoints"),
        }
    finally:
        await conn.close()


async def checkpoint(db_url: str) -> int:
    try:
        conn = await asyncpg.connect(db_url, timeout=5)
    except (OSError, asyncpg.PostgresError):
        return -1
    try:
        return int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM checkpoints"))
    except asyncpg.PostgresError:  # tables not created yet
        return -1
    finally:
        await conn.close()


async def wait_checkpoint(db_url: str, seq: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> int:
    deadline = time.monotonic() + timeout
    got = -1
    while time.monotonic() < deadline and alive():
        got = await checkpoint(db_url)
        if got >= seq:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"read models at sequence {got}, stream at {seq} (workers alive: {alive()})")


def expected(issues: int, last_seq: int) -> dict[str, Any]:
    n = issues
    return {"issues": n, "in_progress": n, "tasks": n, "acknowledged": n, "audit": n * EVENTS_PER_ISSUE,
            "audit_distinct": n * EVENTS_PER_ISSUE,
            "stats": {"reported": n, "issues_dispatched": n, "tasks_dispatched": n, "tasks_acknowledged": n,
                      "tasks_ack_on_time": n, "tasks_ack_due": n},
            "dept": {"tasks_dispatched": n, "tasks_acknowledged": n, "tasks_ack_on_time": n, "tasks_ack_due": n},
            "checkpoint": last_seq}


def without_zero(d: dict[str, Any]) -> dict[str, Any]:
    return {k: ({m: n for m, n in v.items() if n and m != "dispatch_ms_sum"} if isinstance(v, dict) else v)
            for k, v in d.items()}


# -- SIGKILL ------------------------------------------------------------------------------------------------------
@dataclass
class WorkerProcess:
    """``needle run projections`` in a subprocess of its own session; we only ever kill the pid we started."""

    data_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log(self) -> Path:
        return self.data_dir / "projections.log"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # spawn: a session of its own, and SIGTERM if this test process dies first
        self.proc = spawn([NEEDLE, "run", "projections", "--data-dir", str(self.data_dir)], log=self.log,
                          env=self.env)
        self.starts += 1

    async def ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.read_text(errors="replace").count("needle ready") >= self.starts:
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"projections exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"projections not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


async def holding_a_batch(nc: NATS, timeout: float, at_least: int = 10) -> dict[str, int]:
    """Wait (bounded) until the durable consumer has delivered ``at_least`` messages not yet acknowledged."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    info: Any = None
    while time.monotonic() < deadline:
        try:
            info = await js.consumer_info(sj.EVENTS_STREAM, "projections")
            if info.num_ack_pending >= at_least:
                break
        except Exception:  # not created yet by the (re)starting worker
            pass
        await asyncio.sleep(0.005)
    if info is None:
        return {}
    return {"ack_pending": info.num_ack_pending, "delivered": info.delivered.stream_seq,
            "ack_floor": info.ack_floor.stream_seq}


async def sigkill_run(tmp_path: Path, nats_url: str, pg_url: str, *, issues: int, kills: int, seconds: float,
                      seed: int) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, int]]]:
    rnd = random.Random(seed)
    db_url = await ensure_database(pg_url, f"needle_kill_{os.getpid()}_{next(_numbers)}")
    env = {**os.environ, "NEEDLE_NATS_URL": nats_url, "NEEDLE_DATABASE_URL": db_url, "NEEDLE_ORG": str(ORG),
           "NEEDLE_RULES": str(RULES), "NEEDLE_LOG_LEVEL": "warning"}
    worker = WorkerProcess(tmp_path / "projections", env)
    nc, store = await connect(nats_url)
    kills_seen: list[dict[str, int]] = []
    appending: asyncio.Task[None] | None = None
    try:
        worker.start()
        await worker.ready()
        load = Load(store, issues, seconds)
        appending = asyncio.create_task(load.run())
        for k in range(1, kills + 1):
            # a random moment in the k-th slice of the load, once the worker holds a batch it has not committed
            await load.reached(issues * k // (kills + 1))
            await asyncio.sleep(rnd.uniform(0.0, 0.4))
            state = await holding_a_batch(nc, timeout=3.0)
            worker.kill()
            state["checkpoint_at_kill"] = await checkpoint(db_url)
            kills_seen.append(state)
            await asyncio.sleep(rnd.uniform(0.0, 0.3))
            worker.start()
            await worker.ready()
        await appending
        last = await stream_last_seq(nc)
        await wait_checkpoint(db_url, last, timeout=60)
        return without_zero(await read_models(db_url)), expected(issues, last), kills_seen
    finally:
        await cancel(appending)
        worker.stop()
        await nc.close()


async def test_a_batch_fetched_by_a_worker_that_died_is_projected_by_its_successor(
        tmp_path: Path, nats_factory: Callable[..., Any], pg_url: str) -> None:
    """The SIGKILL below, made deterministic: a worker fetches 20 events from the durable consumer and dies before
    its commit; they stay delivered-unacknowledged there (ack_wait 120 s) while more events arrive."""
    nats_url = nats_factory().url
    db_url = await ensure_database(pg_url, f"needle_gap_{os.getpid()}_{next(_numbers)}")
    await upgrade(db_url)
    pool = await open_pool(db_url)
    nc, store = await connect(nats_url)
    writer = ProjectionWriter(load_org(ORG), load_rulebook(RULES).tz)
    successor: asyncio.Task[None] | None = None
    try:
        load = Load(store, 10, 0)
        await load.run()  # 40 events: seqs 1..40
        dying = await nats.connect(nats_url)
        sub = await dying.jetstream().pull_subscribe(
            sj.ALL_EVENTS, durable="projections", stream=sj.EVENTS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.ALL, deliver_policy=DeliverPolicy.ALL, ack_wait=120,
                                  max_ack_pending=50_000, max_deliver=-1))
        batch = await sub.fetch(20, timeout=2)
        assert [m.metadata.sequence.stream for m in batch] == list(range(1, 21))
        await dying.close()  # gone before its commit: nothing written, nothing acked
        more = Load(store, 5, 0)
        await more.run()  # 20 more events
        last = await stream_last_seq(nc)
        worker = ProjectionWorker(pool, nc.jetstream(), writer)
        successor = asyncio.create_task(worker.run())
        assert await worker.wait_for(last, 20)
        got = without_zero(await read_models(db_url))
        assert got == expected(15, last), got
    finally:
        await cancel(successor)
        await pool.close()
        await nc.close()


@pytest.mark.slow  # restart/fault or bench smoke: `pytest -m slow`
async def test_sigkilled_worker_ends_with_exact_counts(tmp_path: Path, nats_factory: Callable[..., Any],
                                                       pg_url: str) -> None:
    got, want, kills = await sigkill_run(tmp_path, nats_factory().url, pg_url, issues=500, kills=3, seconds=12,
                                         seed=1)
    assert len(kills) == 3
    assert got == want, kills


@pytest.mark.slow
async def test_sigkilled_worker_ends_with_exact_counts_over_10000_events(
        tmp_path: Path, nats_factory: Callable[..., Any], pg_url: str) -> None:
    got, want, kills = await sigkill_run(tmp_path, nats_factory().url, pg_url, issues=2500, kills=4, seconds=24,
                                         seed=2)
    assert len(kills) == 4
    assert got == want, kills


# -- Postgres restarted mid-load ------------------------------------------------------------------------------------
async def start_postgres(pg: EmbeddedPostgres, timeout: float = 30.0) -> None:
    """Start and wait until it accepts queries: ``EmbeddedPostgres.start`` returns once the port listens, while
    Postgres may still answer 57P03 "the database system is starting up"."""
    await asyncio.to_thread(pg.start)
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await asyncpg.connect(pg.url, timeout=5)
            await conn.close()
            return
        except (OSError, asyncpg.PostgresError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def healthz(h: NeedleHandle) -> int:
    try:
        return (await h.client.get("/healthz")).status_code
    except Exception:
        return 0


async def waiting_on_the_lock(conn: asyncpg.Connection, timeout: float = 10.0) -> int:
    """Until the worker's batch transaction blocks on the writers' advisory lock held by ``conn``; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = await conn.fetchval("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                  "AND query LIKE '%pg_advisory_xact_lock%' AND pid <> pg_backend_pid()")
        if pid:
            return int(pid)
        await asyncio.sleep(0.02)
    raise AssertionError("the worker never started a batch")


async def postgres_restart_run(tmp_path: Path, nats_url: str, *, issues: int, seconds: float, outages: int,
                               outage_s: float, during_batch: bool
                               ) -> tuple[dict[str, Any], dict[str, Any], list[int], dict[str, bool]]:
    """A load of ``issues`` over ``seconds``; at 1/(outages+1), 2/(outages+1)... of it Postgres is stopped (fast
    shutdown: backends terminated) for ``outage_s`` while the load goes on, then started again on its port.
    ``during_batch``: the stop comes while the worker's batch transaction is in flight (blocked on the writers'
    advisory lock, which the test holds); otherwise at whatever the worker is doing then."""
    pg = EmbeddedPostgres(tmp_path / "pg-own")
    await start_postgres(pg)
    h: NeedleHandle | None = None
    nc: NATS | None = None
    appending: asyncio.Task[None] | None = None
    try:
        h = await start_needle(tmp_path / "needle", org=ORG, rules=RULES, nats_url=nats_url, pg_admin_url=pg.url,
                               database="needle_restart", services=("intake", "projections"))
        db_url = h.stack.urls.database
        assert db_url is not None
        assert await healthz(h) == 200
        nc, store = await connect(nats_url)
        load = Load(store, issues, seconds)
        appending = asyncio.create_task(load.run())
        codes: list[int] = []
        for k in range(1, outages + 1):
            await load.reached(issues * k // (outages + 1))
            blocker = None
            if during_batch:  # caught up, then one more chunk: the worker's batch waits on the lock we hold
                load.gate.clear()
                await wait_checkpoint(db_url, await stream_last_seq(nc), timeout=20)
                blocker = await asyncpg.connect(db_url)
                await blocker.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
                load.gate.set()
                await waiting_on_the_lock(blocker)
            # when Postgres goes away while the load goes on, and comes back on the same port
            port = pg.port
            await asyncio.to_thread(pg.stop)
            if blocker is not None:
                blocker.terminate()
            t_end = time.monotonic() + outage_s
            while time.monotonic() < t_end:
                codes.append(await healthz(h))
                await asyncio.sleep(0.1)
            pg = EmbeddedPostgres(tmp_path / "pg-own", port=port)
            await asyncio.to_thread(pg.start)  # the worker must cope with "starting up" by itself
        await appending
        last = await stream_last_seq(nc)
        stack = h.stack
        await wait_checkpoint(db_url, last, timeout=30, alive=lambda: not any(t.done() for t in stack.life.tasks))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            codes.append(await healthz(h))
            if codes[-1] == 200:
                break
            await asyncio.sleep(0.1)
        return without_zero(await read_models(db_url)), expected(issues, last), codes, dict(h.stack.health)
    finally:
        await cancel(appending)
        if nc is not None:
            await nc.close()
        if h is not None:
            await h.close()
        await asyncio.to_thread(pg.stop)


@pytest.mark.slow  # restart/fault or bench smoke: `pytest -m slow`
async def test_postgres_stopped_during_a_batch_the_worker_holds_it_and_recovers(
        tmp_path: Path, nats_factory: Callable[..., Any]) -> None:
    got, want, codes, health = await postgres_restart_run(tmp_path, nats_factory().url, issues=500, seconds=5,
                                                          outages=1, outage_s=2.0, during_batch=True)
    assert 503 in codes[:-1], codes  # the outage was visible
    assert codes[-1] == 200, (codes, health)
    assert got == want


@pytest.mark.slow  # restart/fault or bench smoke: `pytest -m slow`
async def test_postgres_restarted_mid_load_the_worker_recovers_by_itself(tmp_path: Path,
                                                                         nats_factory: Callable[..., Any]) -> None:
    got, want, codes, health = await postgres_restart_run(tmp_path, nats_factory().url, issues=500, seconds=5,
                                                          outages=1, outage_s=2.0, during_batch=False)
    assert 503 in codes[:-1], codes
    assert codes[-1] == 200, (codes, health)
    assert got == want


@pytest.mark.slow
async def test_postgres_restarted_twice_over_10000_events(tmp_path: Path, nats_factory: Callable[..., Any]) -> None:
    got, want, codes, health = await postgres_restart_run(tmp_path, nats_factory().url, issues=2500, seconds=20,
                                                          outages=2, outage_s=3.0, during_batch=False)
    assert 503 in codes[:-1], codes
    assert codes[-1] == 200, (codes, health)
    assert got == want


async def test_a_cancelled_batch_is_retried_and_the_worker_lives_on(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(services=("intake", "projections"))
    db_url = h.stack.urls.database
    assert db_url is not None and h.stack.store is not None
    worker: ProjectionWorker = h.stack.projection_worker
    assert h.stack.nc is not None
    await Load(h.stack.store, 5, 0).run()
    assert await worker.wait_for(await stream_last_seq(h.stack.nc), 10)
    blocker = await asyncpg.connect(db_url)
    try:
        # given the worker's next batch waits on the writers' lock (as it does behind a rebuild's swap)
        await blocker.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        await Load(h.stack.store, 5, 0).run()
        pid = await waiting_on_the_lock(blocker)
        # when its statement is cancelled (pg_cancel_backend, statement_timeout, lock_timeout all look alike)
        assert await blocker.fetchval("SELECT pg_cancel_backend($1)", pid)
        await asyncio.sleep(0.3)
        await blocker.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await blocker.close()
    # then the batch is retried: every event projected once, and the service stays healthy
    last = await stream_last_seq(h.stack.nc)
    assert await worker.wait_for(last, 15), (worker.seq, last, h.stack.health)
    assert (await h.client.get("/healthz")).status_code == 200
    assert without_zero(await read_models(db_url)) == expected(10, last)


async def test_a_lost_consumer_is_recreated_at_the_checkpoint(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(services=("intake", "projections"))
    assert h.stack.nc is not None and h.stack.store is not None and h.stack.urls.database
    worker: ProjectionWorker = h.stack.projection_worker
    await Load(h.stack.store, 5, 0).run()
    assert await worker.wait_for(await stream_last_seq(h.stack.nc), 10)
    # when the durable consumer goes away while events keep coming
    await h.stack.nc.jetstream().delete_consumer(sj.EVENTS_STREAM, "projections")
    await Load(h.stack.store, 5, 0).run()
    last = await stream_last_seq(h.stack.nc)
    # then the worker carries on from its checkpoint (or at least says it cannot)
    caught_up = await worker.wait_for(last, 5)
    healthy = (await h.client.get("/healthz")).status_code == 200
    assert caught_up or not healthy, "stalled while /healthz says 200"
    assert caught_up, (worker.seq, last, h.stack.health)
    assert without_zero(await read_models(h.stack.urls.database)) == expected(10, last)


async def test_a_worker_started_before_its_stream_exists_waits_for_it(
        nats_factory: Callable[..., Any], pg_url: str) -> None:
    """In a cluster the projections may start while the stream is still being created or has no leader yet:
    the first consumer creation fails like a later one, and is retried like a later one."""
    nats_url = nats_factory().url
    db_url = await ensure_database(pg_url, f"needle_early_{os.getpid()}_{next(_numbers)}")
    await upgrade(db_url)
    pool = await open_pool(db_url)
    early = await nats.connect(nats_url)
    health: dict[str, bool] = {}
    worker = ProjectionWorker(pool, early.jetstream(), ProjectionWriter(load_org(ORG), load_rulebook(RULES).tz),
                              health=health)
    running = asyncio.create_task(worker.run())
    nc: NATS | None = None
    try:
        await asyncio.sleep(1.5)  # no NEEDLE_EVENTS yet: every attempt fails
        assert not running.done() and health.get("projections") is False, (running, health)
        nc, store = await connect(nats_url)  # now the stream exists
        await Load(store, 5, 0).run()
        last = await stream_last_seq(nc)
        assert await worker.wait_for(last, 20), (worker.seq, last, health)
        assert health["projections"] is True
        assert without_zero(await read_models(db_url)) == expected(5, last)
    finally:
        await cancel(running)
        await pool.close()
        await early.close()
        if nc is not None:
            await nc.close()
