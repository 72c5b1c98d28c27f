"""``needle bench timers``: N durable SLA timers (JetStream message schedules in NEEDLE_TIMERS)
held by `needle run router`: pending schedules, router / nats-server RSS and CPU (1 s samples), and
per acknowledge edge (warn at X/2, breach at X) the count recorded and the lag = CloudEvent ``time``
- edge. A scratch server first calibrates the router (to pick X so that every report is dispatched
before X/2) and fires K raw schedules ``@at`` one second (baseline). The rulebook is the contract
one with ``road_damage`` ``acknowledge: PT{X}S`` (natural, warn_at 0.5); only a return escalates."""
from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from rich.table import Table

from shared.events import subjects as sj
from shared.store.eventstore import JetStreamEventStore
from shared.store.streams import _create_or_update

from .common import Counter, busy_warning, count_matching, machine, percentile, read_timestamps, scratch_nats
from .procs import CONTRACT_ORG, CONTRACT_RULES, Child, needle_argv
from .router import _issue_id, append_report, throughput

Say = Callable[[str], None]
WARN_AT = 0.5
SCRATCH = "BENCH_SCHED"


def proc_stat(pid: int) -> dict[str, float]:
    """RSS (kB) and CPU seconds used so far by a process; {} once it is gone."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        rss = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS:"))
        ticks = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]  # utime, stime
        return {"rss_kb": int(rss.split()[1]), "cpu_s": round(sum(map(int, ticks)) / os.sysconf("SC_CLK_TCK"), 2)}
    return {}


def cpu_pct(series: list[dict[str, Any]], key: str, since: float) -> float | None:
    """Mean CPU % of a process over the samples taken after ``since`` (time.time())."""
    rows = [r for r in series if r["t"] >= since and key in r]
    ok = len(rows) > 1 and rows[-1]["t"] > rows[0]["t"]
    return round(100 * (rows[-1][key] - rows[0][key]) / (rows[-1]["t"] - rows[0]["t"]), 1) if ok else None


def dist(xs: list[float]) -> dict[str, float | None]:
    r = {"p50_ms": percentile(xs, 50), "p99_ms": percentile(xs, 99), "max_ms": max(xs, default=None)}
    return {k: None if v is None else round(v, 1) for k, v in r.items()}


def write_rulebook(path: Path, ack_s: int) -> Path:
    """The contract rules, ``road_damage`` acknowledged within ``ack_s``; breaches never escalate."""
    rules = {**yaml.safe_load(CONTRACT_RULES.read_text()), "warn_at": WARN_AT, "escalate": {"on": ["return"]}}
    rules["categories"]["road_damage"]["sla"] = {"acknowledge": f"PT{ack_s}S", "resolve": "PT24H", "clock": "natural"}
    path.write_text(yaml.safe_dump(rules, allow_unicode=True, sort_keys=False))
    return path


def router_env(nats_url: str, rules: Path, root: Path) -> dict[str, str]:
    return {"NEEDLE_NATS_URL": nats_url, "NEEDLE_ORG": str(CONTRACT_ORG), "NEEDLE_RULES": str(rules),
            "NEEDLE_DATA_DIR": str(root / "router-data"), "NEEDLE_LOG_LEVEL": "warning"}


async def pool(n: int, one: Callable[[int], Awaitable[Any]], window: int = 256) -> float:
    """``one(i)`` for i < n through ``window`` workers (no task per item: fine at a million); items/s."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one(left)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(window, n))))
    return n / (time.perf_counter() - t0)


async def paced(n: int, rate: float, one: Callable[[int], Coroutine[Any, Any, Any]], window: int = 256) -> float:
    """``one(i)`` for i < n started at ``rate`` per second (open loop: item i at t0 + i / rate, whatever the
    earlier ones do; at most ``window`` in flight); items/s achieved."""
    room = asyncio.Semaphore(window)
    running: set[asyncio.Task[Any]] = set()
    t0 = time.perf_counter()
    for i in range(n):
        ahead = t0 + i / rate - time.perf_counter()
        if ahead > 0:
            await asyncio.sleep(ahead)
        await room.acquire()
        task: asyncio.Task[Any] = asyncio.create_task(one(i))
        running.add(task)
        task.add_done_callback(running.discard)
        task.add_done_callback(lambda _: room.release())
    await asyncio.gather(*running)
    return n / (time.perf_counter() - t0)


async def calibrate(nc: NATS, url: str, root: Path, n: int, say: Say) -> dict[str, Any]:
    """`needle run router` (contract rules) on a backlog of ``n`` reports: routed/s, and drained/s
    (routed AND every task's timer scheduled: the router's consumer has nothing left)."""
    say(f"calibration: `needle run router` on a backlog of {n:,} reports (scratch server) ...")
    store = JetStreamEventStore(nc)
    await store.start()
    env, children = router_env(url, CONTRACT_RULES, root / "cal"), []

    def start() -> Child:
        children.append(Child.start("router (calibration)", needle_argv("run", "router"),
                                    root / "logs" / "router-calibration.log", env=env))
        return children[-1]

    try:
        thr = await throughput(nc, store, n, start, say)
    finally:
        for c in children:
            c.stop()
    return {"issues": n, "routed_per_s": thr["routed_per_s"], "drain_wall_s": thr["drain_wall_s"],
            "drained_per_s": round(n / max(thr["drain_wall_s"], 0.1), 1)}


async def scratch_runs(root: Path, cal_issues: int, baseline_k: int, say: Say) -> tuple[dict[str, Any], Any]:
    """Calibration and baseline on a scratch nats-server, so that the needle run starts clean."""
    async with scratch_nats(root / "scratch-nats") as (embedded, nc):
        cal = await calibrate(nc, embedded.url, root, cal_issues, say) if cal_issues else {"skipped": True}
        base = await schedule_baseline(nc, baseline_k, say) if baseline_k else None
    return cal, base


def choose_ack_seconds(issues: int, rate: float, report_rate: float | None = None) -> int:
    """X with X/2 >= 1.5 x the expected dispatch+schedule time + 10 s, rounded up to 10 s; with reports paced
    at ``report_rate``, X/2 >= the reporting time x 1.1 + 20 s (every timer pending before the first edge)."""
    span = 1.5 * issues / rate if report_rate is None else 1.1 * issues / min(rate, report_rate) + 10
    return int(max(20, 10 * math.ceil(2 * (span + 10) / 10)))


async def schedule_baseline(nc: NATS, k: int, say: Say) -> dict[str, Any]:
    """K schedules ``@at`` one second in a scratch stream; when are their fired copies stored?"""
    await _create_or_update(nc, {"name": SCRATCH, "subjects": ["bench.sched.>"], "storage": "file",
                                 "retention": "limits", "num_replicas": 1, "allow_msg_schedules": True})
    js = nc.jetstream()
    at = datetime.fromtimestamp(math.ceil(time.time() + k / 3000 + 3), UTC)
    stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    say(f"baseline: {k:,} JetStream schedules @at {stamp} in a scratch stream ...")

    async def one(i: int) -> None:
        await js.publish(f"bench.sched.s.{i}", b"x", headers={
            "Nats-Schedule": f"@at {stamp}", "Nats-Schedule-Target": f"bench.sched.f.{i}"})

    publish_rate = await pool(k, one)
    published = time.time()
    # the fired copies are stored in the stream (not published on core NATS): read their timestamps
    n = await poll(js, SCRATCH, "bench.sched.f.>", k, max(published, at.timestamp()) + 30 + k / 2000)
    stamps = [ts.timestamp() for _, ts in await read_timestamps(js, SCRATCH, "bench.sched.f.>", start_seq=1,
                                                                 expected=n)]
    late = [(a - at.timestamp()) * 1000 for a in stamps]
    span = max(stamps) - min(stamps) if len(stamps) > 1 else 0.0
    say(f"  fired {len(stamps):,}/{k:,}, spread {span:.3f} s, p99 {dist(late)['p99_ms']} ms after @at")
    return {"schedules": k, "at": at.isoformat(), "publish_per_s": round(publish_rate, 1),
            "published_before_at": published < at.timestamp(), "fired": len(stamps),
            "stored_after_at": dist(late), "fire_spread_s": round(span, 3),
            "fired_per_s": round(len(stamps) / span, 1) if span > 0 else None}


async def timer_counts(js: Any) -> tuple[int, int]:
    """(pending schedules, fired timers not acked yet) in NEEDLE_TIMERS. A work-queue stream allows one
    consumer per subject filter (the router's, on fired timers), so no counting consumer: the stream's
    message count less what the router's consumer has still to acknowledge."""
    messages = int((await js.stream_info(sj.TIMERS_STREAM)).state.messages)
    try:
        info = await js.consumer_info(sj.TIMERS_STREAM, "router-timers")
    except NotFoundError:
        return messages, 0
    fired = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
    return messages - fired, fired


async def poll_schedules(js: Any, target: int, until: float, every: float = 0.2) -> int:
    """Pending schedules once ``target`` or ``until``."""
    n = (await timer_counts(js))[0]
    while n < target and time.time() < until:
        await asyncio.sleep(every)
        n = (await timer_counts(js))[0]
    return n


async def sample(nc: NATS, pids: dict[str, int], series: list[dict[str, Any]]) -> None:
    """Every second until cancelled: RSS and CPU of each process, schedules pending in NEEDLE_TIMERS."""
    js = nc.jetstream()
    while True:
        row = {"t": round(time.time(), 1), **{f"{k}_{m}": v for k, p in pids.items()
                                              for m, v in proc_stat(p).items()}}
        with contextlib.suppress(Exception):
            row["pending"], row["fired_unacked"] = await timer_counts(js)
        series.append(row)
        await asyncio.sleep(1.0)


def series_max(series: list[dict[str, Any]], key: str) -> int:
    return max((r[key] for r in series if r.get(key) is not None), default=0)


def _3(d: dict[str, Any]) -> str:
    return f"{d['p50_ms']} / {d['p99_ms']} / {d['max_ms']}"


async def watch_edges(nc: NATS) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Core NATS subscriber to sla_warned / sla_breached: arrival time per (edge, task), and messages
    seen (a core subscriber also sees the publishes that JetStream then refused: OCC conflicts)."""
    arrival: dict[str, dict[str, float]] = {"warn": {}, "breach": {}}
    seen = {"warn": 0, "breach": 0}

    async def on_msg(msg: Msg) -> None:
        now, data = time.time(), orjson.loads(msg.data)["data"]
        if data.get("clock") == "acknowledge":
            kind = "warn" if msg.subject.endswith("sla_warned") else "breach"
            seen[kind] += 1
            arrival[kind][data["task_id"]] = now

    for name in ("sla_warned", "sla_breached"):
        await nc.subscribe(sj.events_of_type(name), cb=on_msg, pending_msgs_limit=5_000_000, pending_bytes_limit=-1)
    return arrival, seen


async def read_events(js: Any, subject: str, start_seq: int) -> list[dict[str, Any]]:
    """Every event stored on ``subject`` from ``start_seq``, as CloudEvent dicts."""
    expected = await count_matching(js, sj.EVENTS_STREAM, subject, start_seq)
    sub = await js.pull_subscribe(subject, stream=sj.EVENTS_STREAM, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq, ack_policy=AckPolicy.NONE,
        inactive_threshold=60.0))
    out: list[dict[str, Any]] = []
    misses = 0
    try:
        while len(out) < expected and misses < 10:
            try:
                out.extend(orjson.loads(m.data) for m in await sub.fetch(2000, timeout=1))
            except NatsTimeout:
                misses += 1
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def edge_lags(dispatched: list[dict[str, Any]], recorded: dict[str, list[dict[str, Any]]],
              watch: tuple[dict[str, dict[str, float]], dict[str, int]], t_stop: float) -> dict[str, Any]:
    """Per acknowledge edge: lag = CloudEvent time of the stored warn/breach - the task's edge time
    (from its task_dispatched); an edge not recorded by ``t_stop`` counts as ``t_stop - edge`` in
    ``lag_incl_unrecorded`` (a lower bound of its lag)."""
    edges = {d["data"]["task_id"]: (_ts(d["data"]["acknowledge_warn"]), _ts(d["data"]["acknowledge_due"]))
             for d in dispatched}
    out: dict[str, Any] = {}
    for i, kind in enumerate(("warn", "breach")):
        at: dict[str, float] = {}
        for ce in recorded[kind]:
            if ce["data"]["clock"] == "acknowledge":
                at.setdefault(ce["data"]["task_id"], _ts(ce["time"]))
        lag = [(t - edges[task][i]) * 1000 for task, t in at.items() if task in edges]
        unrecorded = [(t_stop - e[i]) * 1000 for task, e in edges.items() if task not in at]
        arrival = watch[0][kind]
        out[kind] = {"expected": len(edges), "stored": len(at), "seen_on_core_nats": watch[1][kind],
                     "lag_event_time": dist(lag), "lag_incl_unrecorded": dist(lag + unrecorded),
                     "lag_seen_by_subscriber": dist([(arrival[t] - edges[t][i]) * 1000 for t in at
                                                     if t in arrival and t in edges])}
    return out


async def poll(js: Any, stream: str, subject: str, target: int, until: float, every: float = 0.2,
               start_seq: int | None = None) -> int:
    """Messages on ``subject`` once ``target`` or ``until``; counter renewed (idle ones expire at 300 s)."""
    while True:
        async with Counter(js, stream, subject, start_seq=start_seq) as counter:
            renew = time.time() + 200
            n = await counter.count()
            while n < target and time.time() < min(until, renew):
                await asyncio.sleep(every)
                n = await counter.count()
        if n >= target or time.time() >= until:
            return n


async def _after(js: Any, start_seq: int) -> dict[str, Any]:
    tstate = (await js.stream_info(sj.TIMERS_STREAM)).state
    out = {"escalations_stored": await count_matching(js, sj.EVENTS_STREAM, sj.events_of_type("issue_escalated"),
                                                      start_seq),
           "pending_schedules": (await timer_counts(js))[0],
           "fired_copies_kept_in_timers_stream": (await timer_counts(js))[1],
           "timers_stream_messages": int(tstate.messages), "timers_stream_bytes": int(tstate.bytes)}
    for stream, durable in ((sj.TIMERS_STREAM, "router-timers"), (sj.EVENTS_STREAM, "router")):
        info = await js.consumer_info(stream, durable)
        out[f"{durable}_unprocessed"] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
    return out


async def _run(tasks: int, ack_s: int | None, baseline_k: int, grace_s: float, root: Path,
               say: Say, report_rate: float | None = None) -> dict[str, Any]:
    issues = tasks // 2
    cal, base = await scratch_runs(root, 0 if ack_s else min(issues, 5000), baseline_k, say)
    if ack_s is None:
        ack_s = choose_ack_seconds(issues, cal["drained_per_s"], report_rate)
        say(f"  router: {cal['routed_per_s']:,.0f} issues/s routed, {cal['drained_per_s']:,.0f}/s routed and "
            f"scheduled -> acknowledge PT{ack_s}S (first edge after {ack_s * WARN_AT:.0f} s)")
    router: Child | None = None
    async with scratch_nats(root / "nats-data", pending_size=256 * 1024 * 1024) as (embedded, nc):
        try:
            store = JetStreamEventStore(nc)
            await store.start()
            router = Child.start("needle run router", needle_argv("run", "router"), root / "logs" / "router.log",
                                 env=router_env(embedded.url, write_rulebook(root / "rules.yaml", ack_s), root))
            await asyncio.to_thread(router.wait_line, "needle ready", 120)
            series: list[dict[str, Any]] = []
            pids = {"router": router.proc.pid, "nats": embedded.proc.pid}  # type: ignore[union-attr]
            sampler = asyncio.create_task(sample(nc, pids, series))
            watch = await watch_edges(nc)
            js = nc.jetstream()
            start_seq = int((await js.stream_info(sj.EVENTS_STREAM)).state.last_seq) + 1
            say(f"needle: {issues:,} reports -> {tasks:,} tasks / timers (acknowledge PT{ack_s}S) ...")
            t_pub = time.time()
            publish_rate = await (pool(issues, lambda _: append_report(store, _issue_id())) if report_rate is None
                                  else paced(issues, report_rate, lambda _: append_report(store, _issue_id())))
            say(f"  published at {publish_rate:,.0f}/s; waiting for every dispatch ...")
            first_edge = t_pub + ack_s * WARN_AT
            d = await poll(js, sj.EVENTS_STREAM, sj.events_of_type("task_dispatched"), tasks,
                           time.time() + max(120.0, issues / 100), start_seq=start_seq)
            t_disp = time.time()
            p = await poll_schedules(js, issues, first_edge)  # one timer per issue, set after its dispatch
            t_pending = time.time()
            say(f"  {d:,} tasks dispatched {t_disp - t_pub:.1f} s and {p:,} schedules pending in {sj.TIMERS_STREAM} "
                f"{t_pending - t_pub:.1f} s after the first report; first edge at +{ack_s * WARN_AT:.0f} s")
            for name in ("sla_warned", "sla_breached"):  # stored edges; stop at the deadline
                await poll(js, sj.EVENTS_STREAM, sj.events_of_type(name), d, t_disp + ack_s + grace_s, 1.0, start_seq)
            t_stop = time.time()
            sampler.cancel()
            recorded = {k: await read_events(js, sj.events_of_type(f"sla_{v}"), start_seq)
                        for k, v in (("warn", "warned"), ("breach", "breached"))}
            dispatches = await read_events(js, sj.events_of_type("task_dispatched"), start_seq)
            edges = edge_lags(dispatches, recorded, watch, t_stop)
            at = [_ts(x["time"]) for x in dispatches] or [t_pub]
            say(f"  warned {edges['warn']['stored']:,}, breached {edges['breach']['stored']:,} of {d:,}")
            after = await _after(js, start_seq)
            errors = [ln for ln in router.tail(1_000_000).splitlines() if "[error" in ln or "Traceback" in ln]
        finally:
            if router is not None:
                router.stop()
    return {
        "calibration": cal, "acknowledge_s": ack_s, "warn_at": WARN_AT, "baseline": base,
        "needle": {
            "issues": issues, "tasks_dispatched": d, "publish_per_s": round(publish_rate, 1),
            "report_rate": report_rate,
            "dispatch_span_s": round(max(at) - min(at), 2), "first_edge_after_s": ack_s * WARN_AT,
            "all_dispatched_before_first_edge": t_disp < first_edge,
            "all_scheduled_before_first_edge": p >= issues and t_pending < first_edge,
            "pending_schedules": p, "pending_schedules_max": series_max(series, "pending"),
            "router_max_rss_mb": round(series_max(series, "router_rss_kb") / 1024, 1),
            "nats_max_rss_mb": round(series_max(series, "nats_rss_kb") / 1024, 1),
            "stopped_after_last_dispatch_s": round(t_stop - max(at), 1),
            # mean CPU % while the edges fire: is the router busy, or waiting?
            "router_cpu_pct_edges": cpu_pct(series, "router_cpu_s", first_edge),
            "nats_cpu_pct_edges": cpu_pct(series, "nats_cpu_s", first_edge),
        },
        "edges": edges,
        "after": after,
        "samples": series,
        "router_log": {"path": str(root / "logs" / "router.log"), "error_lines": errors[:20]},
    }


def timers_table(r: dict[str, Any]) -> Table:
    n, b, a, rows = r["needle"], r.get("baseline"), r["after"], []
    t = Table(title=f"needle bench timers — {r['tasks']:,} timers, acknowledge PT{r['acknowledge_s']}S "
                    f"(warn at {r['warn_at']:.0%}), {r['machine']['cpus']} CPUs")
    for col, justify in (("measure", "left"), ("value", "right")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    if b:
        rows += [(f"baseline: {b['schedules']:,} raw schedules @at one second: fired / spread s",
                  f"{b['fired']:,} / {b['fire_spread_s']}"),
                 ("baseline: fired copy stored after @at p50 / p99 / max ms", _3(b["stored_after_at"]))]
    rows += [("tasks dispatched (span s)", f"{n['tasks_dispatched']:,} ({n['dispatch_span_s']})"),
             ("all dispatched / all scheduled before the first edge",
              f"{n['all_dispatched_before_first_edge']} / {n['all_scheduled_before_first_edge']}"),
             ("pending schedules, then / max", f"{n['pending_schedules']:,} / {n['pending_schedules_max']:,}"),
             ("max RSS MB: router / nats-server", f"{n['router_max_rss_mb']} / {n['nats_max_rss_mb']}"),
             ("CPU % during edges: router / nats", f"{n['router_cpu_pct_edges']} / {n['nats_cpu_pct_edges']}")]
    for kind, label in (("warn", "ack warn"), ("breach", "ack breach")):
        e = r["edges"][kind]
        rows += [(f"{label}: stored / expected (core NATS saw)",
                  f"{e['stored']:,} / {e['expected']:,} ({e['seen_on_core_nats']:,})"),
                 (f"{label}: lag (event time) p50 / p99 / max ms", _3(e["lag_event_time"])),
                 (f"{label}: lag incl. not recorded at stop, ms", _3(e["lag_incl_unrecorded"]))]
    rows += [("after: pending schedules / fired timers not acked",
              f"{a['pending_schedules']:,} / {a['fired_copies_kept_in_timers_stream']:,}")]
    for row in rows:
        t.add_row(*row)
    return t


def run_timers_bench(*, tasks: int = 100_000, ack_s: int | None = None, baseline: int | None = None,
                     grace_s: float = 60.0, workdir: Path | None = None, keep: bool = False,
                     say: Say = lambda _: None, rate: float | None = None) -> dict[str, Any]:
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="needle-bench-timers-"))
    root.mkdir(parents=True, exist_ok=True)
    facts = machine()
    if warning := busy_warning():
        say(f"WARNING: {warning}")
    k = min(tasks, 100_000) if baseline is None else baseline
    try:
        out = asyncio.run(_run(tasks - tasks % 2, ack_s, k, grace_s, root, say, rate))
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return {"benchmark": "timers", "machine": facts, "tasks": tasks - tasks % 2, **out}
