"""``needle bench router``: how fast the router turns reports into dispatched tasks, against raw
JetStream consume+publish on the same embedded nats-server.

1. baseline: ``rawjs.raw_baseline`` (fetch, publish one message with acks awaited, ack).
2. throughput: N ``IssueReported`` appended straight into NEEDLE_EVENTS (as intake would), then
   ``needle run router`` (a separate process, as in a scaled deployment) drains the backlog;
   issues routed/s = N / (stream time of the last ``task_dispatched`` - stream time of the first
   ``issue_routed``).
3. latency: reports published open-loop at a fixed rate (500/s for 20 s); report -> dispatched
   from the publish time to the ``task_dispatched`` message's stream timestamp (and to its
   arrival on a core NATS subscription)."""
from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.domain.ids import new_issue_id
from shared.events import subjects as sj
from shared.events.codec import encode
from shared.events.models import IssueReported
from shared.store.eventstore import JetStreamEventStore, make_envelopes

from .common import Counter, busy_warning, edge_message, machine, percentile, ratio, read_timestamps, scratch_nats
from .procs import CATEGORY, CONTRACT_ORG, CONTRACT_RULES, GRID, Child, needle_argv
from .rawjs import raw_baseline

Say = Callable[[str], None]
REPORTER = "bench:grid_worker"
SOURCE = "needle/bench"


def _quiet(_: str) -> None:
    return None


def _report(title: str = "bench: pothole on the main road") -> IssueReported:
    return IssueReported(grid=GRID, category=CATEGORY, title=title, reporter=REPORTER,
                         reported_at=datetime.now(UTC))


def _issue_id() -> str:
    return new_issue_id(int(time.time() * 1000), secrets.randbits(80))


async def append_report(store: JetStreamEventStore, issue_id: str) -> int:
    res = await store.append(issue_id, [_report()], expected_last_seq=0, version=0, now=datetime.now(UTC),
                             actor=REPORTER, msg_id=f"report:{issue_id}", source=SOURCE)
    return res.seq


async def publish_reports(store: JetStreamEventStore, n: int, window: int = 256) -> float:
    sem = asyncio.Semaphore(window)

    async def one() -> None:
        async with sem:
            await append_report(store, _issue_id())

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t0)


async def _last_seq(nc: NATS) -> int:
    return int((await nc.jetstream().stream_info(sj.EVENTS_STREAM)).state.last_seq)


async def _wait_count(counter: Counter, target: int, timeout: float, poll: float = 0.1) -> tuple[int, float]:
    """Poll until ``counter`` reaches ``target``; returns (count, monotonic time it was seen)."""
    deadline = time.monotonic() + timeout
    n = await counter.count()
    while n < target and time.monotonic() < deadline:
        await asyncio.sleep(poll)
        n = await counter.count()
    return n, time.monotonic()


async def _wait_drained(nc: NATS, durable: str, timeout: float) -> bool:
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await js.consumer_info(sj.EVENTS_STREAM, durable)
        if not info.num_pending and not info.num_ack_pending:
            return True
        await asyncio.sleep(0.1)
    return False


async def throughput(nc: NATS, store: JetStreamEventStore, n: int, start_router: Callable[[], Child],
                     say: Say) -> dict[str, Any]:
    js = nc.jetstream()
    start_seq = await _last_seq(nc) + 1
    say(f"  publishing {n} IssueReported into {sj.EVENTS_STREAM} (router not started yet) ...")
    publish_rate = await publish_reports(store, n)
    say(f"  backlog published at {publish_rate:.0f}/s; starting `needle run router` ...")
    t_start = time.monotonic()
    router = start_router()
    async with Counter(js, sj.EVENTS_STREAM, sj.events_of_type("issue_routed"), start_seq=start_seq) as routed:
        await asyncio.to_thread(router.wait_line, "needle ready", 120)
        t_ready = time.monotonic()
        count, t_seen = await _wait_count(routed, n, timeout=max(120.0, n / 20))
    dispatched = await count_since(nc, sj.events_of_type("task_dispatched"), start_seq)
    first = await edge_message(js, sj.EVENTS_STREAM, sj.events_of_type("issue_routed"), last=False,
                               start_seq=start_seq)
    last = await edge_message(js, sj.EVENTS_STREAM, sj.events_of_type("task_dispatched"), last=True)
    span = (last[1] - first[1]).total_seconds() if first and last else 0.0
    drained = await _wait_drained(nc, "router", timeout=max(60.0, n / 50))
    t_drained = time.monotonic()
    written = await _last_seq(nc) - start_seq + 1 - n
    return {
        "issues": n, "issues_routed": count, "tasks_dispatched": dispatched,
        "backlog_publish_per_s": round(publish_rate, 1),
        "router_startup_s": round(t_ready - t_start, 2),
        "stream_span_s": round(span, 3),
        "routed_per_s": round(count / span, 1) if span > 0 else None,
        "routed_per_s_wall": round(count / (t_seen - t_ready), 1) if t_seen > t_ready else None,
        "router_drained": drained, "drain_wall_s": round(t_drained - t_ready, 2),
        "events_written_per_issue": round(written / n, 2) if n else None,
        "router_redeliveries": await _redelivered(nc),
    }


async def _redelivered(nc: NATS) -> int:
    info = await nc.jetstream().consumer_info(sj.EVENTS_STREAM, "router")
    return int(info.num_redelivered or 0)


async def count_since(nc: NATS, subject: str, start_seq: int) -> int:
    async with Counter(nc.jetstream(), sj.EVENTS_STREAM, subject, start_seq=start_seq) as c:
        return await c.count()


async def latency(nc: NATS, store: JetStreamEventStore, rate: float, duration_s: float, say: Say) -> dict[str, Any]:
    start_seq = await _last_seq(nc) + 1
    arrivals: dict[str, float] = {}
    sent: dict[str, float] = {}
    failures = 0
    core_messages = 0
    redelivered_before = await _redelivered(nc)

    async def on_dispatched(msg: Msg) -> None:
        nonlocal core_messages
        core_messages += 1
        arrivals.setdefault(msg.subject.split(".")[3], time.time())

    sub = await nc.subscribe(sj.events_of_type("task_dispatched"), cb=on_dispatched, pending_msgs_limit=1_000_000)
    total = int(rate * duration_s)
    say(f"  offering {rate:.0f} reports/s for {duration_s:.0f} s ({total} reports) ...")
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        nonlocal failures
        issue_id = _issue_id()
        sent[issue_id] = time.time()
        try:
            await append_report(store, issue_id)
        except Exception:
            failures += 1
            sent.pop(issue_id, None)

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(total):  # open loop: each report at its own time, whatever the previous one is doing
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    offered_s = loop.time() - t0
    if tasks:
        await asyncio.gather(*tasks)
    async with Counter(nc.jetstream(), sj.EVENTS_STREAM, sj.events_of_type("issue_routed"),
                       start_seq=start_seq) as routed:
        await _wait_count(routed, len(sent), timeout=max(60.0, total / 50))
    await _wait_drained(nc, "router", timeout=60.0)
    await asyncio.sleep(0.5)
    await sub.unsubscribe()
    stored = await count_since(nc, sj.events_of_type("task_dispatched"), start_seq)
    stamps = await read_timestamps(nc.jetstream(), sj.EVENTS_STREAM, sj.events_of_type("task_dispatched"),
                                   start_seq=start_seq, expected=stored)
    stream_at: dict[str, float] = {}
    for subject, ts in stamps:
        stream_at.setdefault(subject.split(".")[3], ts.timestamp())
    to_stream = [(stream_at[i] - t) * 1000 for i, t in sent.items() if i in stream_at]
    to_sub = [(arrivals[i] - t) * 1000 for i, t in sent.items() if i in arrivals]

    def dist(xs: list[float]) -> dict[str, float | None]:
        r = {f"p{p}_ms": percentile(xs, p) for p in (50, 90, 99)}
        r["max_ms"] = max(xs, default=None)
        return {k: None if v is None else round(v, 2) for k, v in r.items()}

    return {
        "offered_rate_per_s": rate, "duration_s": duration_s, "reports": total,
        "achieved_offer_rate_per_s": round(total / offered_s, 1) if offered_s > 0 else None,
        "publish_failures": failures, "dispatched": len(stream_at),
        "report_to_dispatched_stream": dist(to_stream),
        "report_to_dispatched_subscriber": dist(to_sub),
        # a core subscriber also sees the messages of atomic batches that JetStream then refused (OCC
        # conflict, retry after a timeout): more arrivals than stored messages means phantom events
        "task_dispatched_core_messages": core_messages, "task_dispatched_stored": stored,
        "router_redeliveries": await _redelivered(nc) - redelivered_before,
    }


async def _run(n: int, rate: float, latency_s: float, root: Path, say: Say) -> dict[str, Any]:
    router: Child | None = None
    async with scratch_nats(root / "nats-data", pending_size=64 * 1024 * 1024) as (embedded, nc):
        try:
            store = JetStreamEventStore(nc)
            await store.start()
            payload = encode(make_envelopes(_issue_id(), [_report()], version=0, now=datetime.now(UTC),
                                            actor=REPORTER, causation=None, source=SOURCE)[0])
            say(f"baseline: raw JetStream fetch + publish + ack of {n} messages ({len(payload)} B) ...")
            base = await raw_baseline(nc, n, payload)
            say(f"  raw consume+publish: {base['per_s']:.0f}/s")
            env = {"NEEDLE_NATS_URL": embedded.url, "NEEDLE_ORG": str(CONTRACT_ORG),
                   "NEEDLE_RULES": str(CONTRACT_RULES), "NEEDLE_DATA_DIR": str(root / "router-data"),
                   "NEEDLE_LOG_LEVEL": "warning"}
            say("needle: router throughput")

            def start_router() -> Child:
                nonlocal router
                router = Child.start("needle run router", needle_argv("run", "router"), root / "logs" / "router.log",
                                     env=env)
                return router

            thr = await throughput(nc, store, n, start_router, say)
            assert router is not None
            say(f"  routed {thr['issues_routed']} issues at {thr['routed_per_s']}/s")
            lat = await latency(nc, store, rate, latency_s, say)
            errors = [ln for ln in router.tail(1_000_000).splitlines() if "[error" in ln or "Traceback" in ln]
            t_stop = time.monotonic()
            await asyncio.to_thread(router.stop, 60.0)  # SIGTERM to its process group
            stop_s = round(time.monotonic() - t_stop, 2)
            say(f"  `needle run router` stopped {stop_s} s after SIGTERM")
        finally:
            if router is not None:
                router.stop()
    thr["router_stop_after_sigterm_s"] = stop_s
    return {
        "baseline": base, "needle": thr, "latency": lat,
        "router_log": {"path": str(root / "logs" / "router.log"), "error_lines": errors[:20]},
        "ratio_routed_vs_raw": ratio(thr["routed_per_s"], base["per_s"]),
    }


def run_router_bench(*, issues: int = 20_000, rate: float = 500.0, latency_s: float = 20.0,
                     workdir: Path | None = None, keep: bool = False, say: Say = _quiet) -> dict[str, Any]:
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="needle-bench-router-"))
    root.mkdir(parents=True, exist_ok=True)
    facts = machine()
    if warning := busy_warning():
        say(f"WARNING: {warning}")
    try:
        out = asyncio.run(_run(issues, rate, latency_s, root, say))
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return {"benchmark": "router", "machine": facts, "issues": issues, "rate": rate, **out}
