"""``needle bench projections``: the read models' numbers, each beside a baseline measured in the same run.

1. rebuild: NEEDLE_EVENTS filled with ``history`` lives by concurrent ``append_many``, phase by phase (a batch holds
   many issues' events, as in a steady stream); baselines = the rebuild's own ``StreamReader`` reading the stream
   with no decoding, and a durable pull consumer fetching 1000 and acking each batch; needle = ``rebuild()`` into a
   fresh database (its ratio is taken to the faster baseline). Diagnostics: wall split; cProfile if a target is missed.
2. visibility: ``needle up`` (contract org/rules) takes POST /v1/issues at a fixed rate (open loop); every Nth
   report is followed by GET /v1/issues with ``Needle-Min-Seq: <its Needle-Seq>``: report -> visible.
3. stats: stats_daily buckets of 1,000,000 issues of a district over a year (``history`` folded by ``model.apply``,
   scaled), COPY into a fresh database; ``queries.stats`` over 365 days; baseline SELECT 1 on the same pool."""
from __future__ import annotations

import asyncio
import contextlib
import cProfile
import pstats
import random
import secrets
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.entrypoints.embedded import EmbeddedNats, EmbeddedPostgres
from services.projections import queries
from services.projections import rebuild as rb
from services.projections.migrate import upgrade
from services.projections.model import Batch, apply
from services.projections.reader import StreamReader
from services.projections.service import open_pool
from services.projections.worker import ProjectionWriter
from shared.config import load_org, load_rulebook
from shared.domain.ids import new_issue_id, task_id
from shared.events import models as ev
from shared.events import subjects as sj
from shared.events.codec import Envelope
from shared.privacy.issuekeys import IssueKeys
from shared.store.eventstore import AppendRequest, JetStreamEventStore
from shared.store.streams import ensure_streams

from .common import busy_warning, machine, nats_url_from_conf, percentile, ratio
from .intake import Say, _lag, _quiesce, _quiet
from .procs import CONTRACT_ORG, CONTRACT_RULES, GRID, REPO, Child, free_port, issue_token, needle_argv, running

T0 = datetime(2025, 3, 4, 2, 0, tzinfo=UTC)
ZS_ORG, ZS_RULES = REPO / "deploy" / "org" / "zhoushan.yaml", REPO / "deploy" / "rules" / "zhoushan.yaml"
TARGETS = {"rebuild_per_s": 15_000, "rebuild_vs_raw": 0.6, "visible_p99_ms": 250, "stats_p99_ms": 100}
M, H = timedelta(minutes=1), timedelta(hours=1)
Appends = list[tuple[datetime, list[ev.Event]]]  # an issue's life: (time, the events of one append)
SATISFACTION: tuple[ev.Satisfaction, ...] = ("satisfied", "basically_satisfied", "dissatisfied")


def _dist(xs: list[float]) -> dict[str, Any]:
    r = {f"p{p}_ms": percentile(xs, p) for p in (50, 90, 99)} | {"max_ms": max(xs, default=None)}
    return {"n": len(xs)} | {k: None if v is None else round(v, 2) for k, v in r.items()}


def _dispatched(tid: str, dept: str, role: ev.TaskRole, at: datetime) -> ev.TaskDispatched:
    return ev.TaskDispatched(task_id=tid, department=dept, role=role, level="district", clock="natural",
                             dispatched_at=at, acknowledge_due=at + 30 * M, resolve_due=at + 24 * H,
                             acknowledge_warn=at + 24 * M, resolve_warn=at + 19 * H)


def history(rnd: random.Random, issue: str, grid: str, at: datetime, depts: list[str]) -> Appends:
    """A plausible life of one issue, as the appends that record it: (time, events of one append)."""
    lead, d = task_id(issue, 1), at + rnd.uniform(0.5, 20) * M
    routed: list[ev.Event] = [
        ev.IssueRouted(level="district", owner_area="dinghai", reason="reported", rule="r", rulebook_version="v"),
        _dispatched(lead, rnd.choice(depts), "lead", d)]
    if rnd.random() < 0.5:
        routed.append(_dispatched(task_id(issue, 2), rnd.choice(depts), "co", d))
    out: Appends = [(at, [ev.IssueReported(grid=grid, category="road_damage", title=f"pothole {issue[-5:]}",
                                           reporter="gw", reported_at=at)]), (d, routed)]
    if rnd.random() < 0.04:  # 退单, then dispatched again
        out.append((d + 10 * M, [ev.TaskReturned(task_id=lead, by="h", reason="not ours", at=d + 10 * M)]))
        d, lead = d + 20 * M, task_id(issue, 3)
        out.append((d, [_dispatched(lead, rnd.choice(depts), "lead", d)]))
    ack, due = d + rnd.expovariate(1 / 12) * M, d + 24 * H
    if ack > d + 30 * M:
        out.append((d + 30 * M, [ev.SlaBreached(task_id=lead, clock="acknowledge", due=d + 30 * M)]))
    out.append((ack, [ev.TaskAcknowledged(task_id=lead, by="h", at=ack)]))
    if rnd.random() < 0.05:
        out.append((ack + H, [ev.IssueEscalated(from_level="district", to_level="city", cause="requested")]))
    if rnd.random() < 0.06:
        due += 48 * H
        out.append((ack + H, [ev.ExtensionApproved(task_id=lead, by="s", resolve_due=due, resolve_warn=due - H)]))
    if rnd.random() < 0.9:
        done = ack + rnd.expovariate(1 / 10) * H
        out.append((done, [ev.TaskResolved(task_id=lead, by="h", at=done)]))
        if rnd.random() < 0.05:
            out.append((done + H, [ev.IssueVerified(passed=False, by="gw"), ev.IssueReopened(reopen_count=1)]))
            return out
        out.append((done + H, [ev.IssueVerified(passed=True, by="gw"),
                               ev.IssueClosed(reason="verified", on_time=done <= due, closed_at=done + H)]))
        if rnd.random() < 0.6:
            sat = rnd.choices(SATISFACTION, (80, 12, 8))[0]
            out.append((done + 2 * H, [ev.FeedbackRecorded(satisfaction=sat, by="gw")]))
    return out


# -- 1. rebuild ----------------------------------------------------------------------------------------------------
async def fill(store: JetStreamEventStore, events: int, chunk: int = 100, window: int = 8) -> dict[str, Any]:
    """Append phase by phase (every issue's 1st append, then every 2nd...), ``window`` batches in flight."""
    rnd, total, plans = random.Random(7), 0, dict[str, Appends]()
    while total < events:
        at = T0 + timedelta(seconds=len(plans))
        issue = new_issue_id(int(at.timestamp() * 1000), rnd.getrandbits(80))
        plans[issue] = history(rnd, issue, ("wuxing-g1", "wuxing-g2")[len(plans) % 2], at,
                               ["dinghai-roads", "dinghai-police"])
        total += sum(len(evs) for _, evs in plans[issue])
    last, version, sem = dict.fromkeys(plans, 0), dict.fromkeys(plans, 0), asyncio.Semaphore(window)

    async def append(reqs: list[AppendRequest], now: datetime) -> None:
        async with sem:
            for req, res in zip(reqs, await store.append_many(reqs, now=now, source="needle/bench"), strict=True):
                last[req.issue_id], version[req.issue_id] = res.seq, version[req.issue_id] + len(req.events)

    t0 = time.perf_counter()
    for p in range(max(len(pl) for pl in plans.values())):
        reqs = [AppendRequest(i, tuple(pl[p][1]), last[i], version[i], actor="bench") for i, pl in plans.items()
                if len(pl) > p]
        await asyncio.gather(*(append(reqs[k:k + chunk], plans[reqs[k].issue_id][p][0])
                               for k in range(0, len(reqs), chunk)))
    written = sum(version.values())
    return {"issues": len(plans), "events": written, "publish_per_s": round(written / (time.perf_counter() - t0), 1)}


async def raw_fetch_ack(js: Any, batch: int = 1000) -> dict[str, Any]:
    """Baseline: a durable pull consumer over the stream, fetch ``batch`` and ack it (AckPolicy.ALL)."""
    sub = await js.pull_subscribe(sj.ALL_EVENTS, durable="bench-raw-fetch", stream=sj.EVENTS_STREAM,
                                  config=ConsumerConfig(ack_policy=AckPolicy.ALL, deliver_policy=DeliverPolicy.ALL,
                                                        max_ack_pending=50_000, ack_wait=120))
    total, n, t0 = int((await sub.consumer_info()).num_pending or 0), 0, time.perf_counter()
    while n < total and time.perf_counter() - t0 < 300:
        with contextlib.suppress(TimeoutError):  # nats.errors.TimeoutError is one
            msgs = await sub.fetch(batch, timeout=2)
            n += len(msgs)
            await msgs[-1].ack()
    dt = time.perf_counter() - t0
    await js.delete_consumer(sj.EVENTS_STREAM, "bench-raw-fetch")
    return {"events": n, "seconds": round(dt, 3), "per_s": round(n / dt, 1), "batch": batch}


async def raw_read(js: Any) -> dict[str, Any]:
    """Baseline read the way the rebuild reads: the same ``StreamReader`` (consumer, batch size), no decoding."""
    target, reader, n, t0 = await rb.stream_last_seq(js), StreamReader(js), 0, time.perf_counter()
    try:
        while reader.seq < target and time.perf_counter() - t0 < 300:
            n += len(await reader.fetch(target))
    finally:
        await reader.close()
    dt = time.perf_counter() - t0
    return {"events": n, "seconds": round(dt, 3), "per_s": round(n / dt, 1), "batch": reader.size}


async def fresh_db(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f"DROP DATABASE IF EXISTS {name}")
    await conn.execute(f"CREATE DATABASE {name}")
    await conn.close()
    await upgrade(url := f"{admin_url.rsplit('/', 1)[0]}/{name}")
    return url


async def run_rebuild(admin_url: str, js: Any, name: str, profile: bool = False,
                      texts: IssueKeys | None = None) -> dict[str, Any]:
    pool = await open_pool(url := await fresh_db(admin_url, name))
    writer = ProjectionWriter(load_org(CONTRACT_ORG), load_rulebook(CONTRACT_RULES).tz, texts=texts)
    prof = cProfile.Profile() if profile else None
    try:
        with prof or contextlib.nullcontext():  # the reading process's profile (the replay runs in a child)
            r: dict[str, Any] = await rb.rebuild(pool, js, writer, database_url=url)
        r["rows"] = {t: await pool.fetchval(f"SELECT count(*) FROM {t}") for t in ("issues", "tasks", "audit")}
    finally:
        await pool.close()
    return r | ({"profile": _profile_summary(prof)} if prof else {})


def _profile_summary(prof: cProfile.Profile, top: int = 25) -> dict[str, Any]:
    st: dict[Any, Any] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    return {"total_tottime_s": round(sum(v[2] for v in st.values()), 3),
            "top_tottime": [{"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "calls": v[1],
                             "tottime_s": round(v[2], 3), "cumtime_s": round(v[3], 3)}
                            for k, v in sorted(st.items(), key=lambda kv: -kv[1][2])[:top]]}


async def bench_rebuild(nc: Any, admin_url: str, events: int, profile: str, say: Say) -> dict[str, Any]:
    await ensure_streams(nc)
    # as needle stores them: each issue's free text sealed with its own data key (the rebuild opens it)
    texts = IssueKeys(nc, kek=secrets.token_bytes(32))
    await texts.start(watch=False)
    store, js = JetStreamEventStore(nc, texts=texts), nc.jetstream()
    say(f"rebuild: appending ~{events:,} events of realistic histories (append_many, 8 batches in flight) ...")
    filled = await fill(store, events)
    say(f"  {filled['events']:,} events of {filled['issues']:,} issues at {filled['publish_per_s']:,.0f}/s")
    base, acked = await raw_read(js), await raw_fetch_ack(js)
    needle = await run_rebuild(admin_url, js, "bench_rebuild", texts=texts)
    say(f"  baseline: the rebuild's reader alone {base['per_s']:,.0f}/s, durable fetch(1000)+ack "
        f"{acked['per_s']:,.0f}/s; rebuild() {needle['events_per_s']:,.0f} events/s (split {needle['split_s']})")
    out: dict[str, Any] = {"fill": filled, "baseline": base, "baseline_fetch_ack": acked, "needle": needle,
                           "ratio_vs_raw": ratio(needle["events_per_s"], base["per_s"]),
                           "ratio_vs_fetch_ack": ratio(needle["events_per_s"], acked["per_s"])}
    out["meets"] = {"per_s": needle["events_per_s"] >= TARGETS["rebuild_per_s"],
                    "vs_raw": min(out["ratio_vs_raw"] or 0, out["ratio_vs_fetch_ack"] or 0)
                    >= TARGETS["rebuild_vs_raw"]}
    out["rows_ok"] = needle["rows"]["issues"] == filled["issues"] and needle["rows"]["audit"] == filled["events"]
    if profile == "yes" or (profile == "auto" and not all(out["meets"].values())):
        say("  profiling a second rebuild under cProfile ...")
        prof = await run_rebuild(admin_url, js, "bench_rebuild_prof", profile=True, texts=texts)
        out["profiled_run"] = {"events_per_s_under_cprofile": prof["events_per_s"], **prof["profile"]}
    return out


# -- 3. stats ------------------------------------------------------------------------------------------------------
def stats_rows(district: str, issues: int, sample: int, now: datetime) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    """``model.apply`` over ``sample`` issues of the past year in the district's grids; buckets scaled to ``issues``."""
    org, tz = load_org(ZS_ORG), load_rulebook(ZS_RULES).tz
    grids = [g.id for g in org.grids_under(district)]
    depts = [d.id for d in org.departments.values() if d.area == district]
    rnd, total, seq, t0 = random.Random(11), Counter[Any](), 0, time.perf_counter()
    for _ in range(sample):
        at = now - timedelta(days=rnd.uniform(10, 360))
        issue = new_issue_id(int(at.timestamp() * 1000), rnd.getrandbits(80))
        batch = Batch(org=org, tz=tz)
        for t, evs in history(rnd, issue, rnd.choice(grids), at, depts):
            for e in evs:
                seq += 1
                apply(batch, Envelope(id=f"{issue}.{seq}", source="bench", subject=issue, time=t, data=e, seq=seq))
        total.update(batch.stats)
    factor = issues // sample
    rows = [(day, scope, key, metric, n * factor) for (day, scope, key, metric), n in total.items() if n]
    return rows, {"sample_issues": sample, "scale_factor": factor, "events_folded": seq, "bucket_rows": len(rows),
                  "grids": len(grids), "fold_s": round(time.perf_counter() - t0, 2)}


async def _time(fn: Callable[[], Any], reps: int, warm: int = 5) -> dict[str, Any]:
    xs = []
    for _ in range(warm + reps):
        t = time.perf_counter()
        await fn()
        xs.append((time.perf_counter() - t) * 1000)
    return _dist(xs[warm:])


async def bench_stats(admin_url: str, issues: int, sample: int, reps: int, say: Say) -> dict[str, Any]:
    district, now, org = "dinghai", datetime.now(UTC), load_org(ZS_ORG)
    say(f"stats: folding {sample:,} synthetic histories in {district}'s grids, scaled to {issues:,} issues ...")
    rows, facts = await asyncio.to_thread(stats_rows, district, issues, sample, now)
    url = await fresh_db(admin_url, "bench_stats")
    pool = await open_pool(url)
    until = now.astimezone(load_rulebook(ZS_RULES).tz).date()
    kw: dict[str, Any] = {"area": district, "children": [c.id for c in org.children(district)], "until": until,
                          "departments": [d.id for d in org.departments.values() if org.is_under(d.area, district)],
                          "since": until - timedelta(days=365)}
    try:
        t0 = time.perf_counter()
        await pool.copy_records_to_table("stats_daily", records=rows, columns=["day", "scope", "key", "metric", "n"])
        await pool.execute("ANALYZE stats_daily")
        facts["copy_s"] = round(time.perf_counter() - t0, 2)
        reported = (await queries.stats(pool, **kw))["overall"]["counts"].get("reported", 0)
        say(f"  {len(rows):,} bucket rows; district reported = {reported:,}; timing {reps} x queries.stats ...")
        q = await _time(lambda: queries.stats(pool, **kw), reps)
        one = await _time(lambda: pool.fetchval("SELECT 1"), reps)
    finally:
        await pool.close()
    say(f"  queries.stats p50 {q['p50_ms']} ms, p99 {q['p99_ms']} ms (SELECT 1 p50 {one['p50_ms']} ms)")
    out = {"district": district, "issues": issues, "window_days": 365, "children": len(kw["children"]),
           "departments": len(kw["departments"]), "generation": facts, "district_reported": reported,
           "query": q, "baseline_select_1": one, "ratio_p50_vs_select_1": ratio(q["p50_ms"], one["p50_ms"])}
    return out


# -- 2. report -> visible ------------------------------------------------------------------------------------------
class _Http:
    """Bare HTTP/1.1 keep-alive: httpx's CPU per request (and its pool, quadratic once requests queue) saturates."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.auth = port, f"Authorization: Bearer {token}\r\n"
        self.io: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self, method: str, path: str, body: bytes = b"", extra: str = "") -> tuple[int, dict[str, str]]:
        if self.io is None:
            self.io = await asyncio.open_connection("127.0.0.1", self.port)
        r, w = self.io
        w.write(f"{method} {path} HTTP/1.1\r\nHost: bench\r\n{self.auth}{extra}Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        lines = (await r.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        hdrs = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        await r.readexactly(int(hdrs["content-length"]))  # needle always sends one (no chunked responses)
        return int(lines[0].split()[1]), hdrs


async def _call(pool: asyncio.Queue[_Http], *args: Any) -> tuple[int, dict[str, str]]:
    conn = await pool.get()
    try:
        return await conn.send(*args)
    except Exception:
        conn.io = None
        raise
    finally:
        pool.put_nowait(conn)


async def visibility_load(port: int, token: str, rate: float, secs: float, sample: int, conns: int = 32) -> dict:
    post_ms, vis_ms, late_ms, statuses = list[float](), list[float](), list[float](), Counter[str]()
    after_post_ms = list[float]()  # from the 201 to the answer: the read side alone, without the intake's queue
    posts, gets = asyncio.Queue[_Http](), asyncio.Queue[_Http]()  # reads never queue behind writes
    for k in range(conns + conns // 2):
        (posts if k < conns else gets).put_nowait(_Http(port, token))
    body = orjson.dumps({"grid": GRID, "category": "road_damage", "title": "bench: pothole on the main road"})

    async def one(i: int, t0: float) -> None:  # t0: when the report was due (waiting counts: no omission)
        late_ms.append((time.perf_counter() - t0) * 1000)
        try:
            status, hdrs = await _call(posts, "POST", "/v1/issues", body)
            t_201 = time.perf_counter()
            post_ms.append((t_201 - t0) * 1000)
            statuses[str(status)] += 1
            while status == 201 and i % sample == 0:  # the query waits (5 s at most), else 503: ask again
                got, _ = await _call(gets, "GET", f"/v1/issues?area={GRID}&limit=1", b"",
                                     f"Needle-Min-Seq: {hdrs['needle-seq']}\r\n")
                if got == 200:
                    vis_ms.append((time.perf_counter() - t0) * 1000)
                    after_post_ms.append((time.perf_counter() - t_201) * 1000)
                    return
                statuses[f"GET {got}"] += 1
                if got != 503 or time.perf_counter() - t0 > 60:
                    return
        except (OSError, asyncio.IncompleteReadError, KeyError, ValueError) as exc:
            statuses[type(exc).__name__] += 1

    tasks, total, t0, cpu0 = [], int(rate * secs), time.perf_counter(), time.process_time()
    for i in range(total):  # open loop: each report at its own time
        if (delay := t0 + i / rate - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, t0 + i / rate)))
    offered = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    return {"rate": rate, "duration_s": secs, "reports": total, "sample_every": sample, "statuses": {**statuses},
            "connections": conns, "achieved_offer_rate_per_s": round(total / offered, 1),
            "generator_cpu_s": round(time.process_time() - cpu0, 1), "late_at_start": _dist(late_ms),
            "min_seq_503_retries": statuses["GET 503"], "post": _dist(post_ms), "report_to_visible": _dist(vis_ms),
            "created_to_visible": _dist(after_post_ms)}


def bench_visibility(root: Path, rate: float, duration_s: float, sample: int, say: Say) -> dict[str, Any]:
    data_dir, port = root / "up-data", free_port()
    say(f"visibility: `needle up` on http://127.0.0.1:{port} (contract org/rules) ...")
    child = Child.start("needle up", needle_argv("up", "--data-dir", str(data_dir), "--port", str(port), "--org",
                                                 str(CONTRACT_ORG), "--rules", str(CONTRACT_RULES)),
                        root / "logs" / "needle-up.log", env={"NEEDLE_LOG_LEVEL": "warning"})
    with running(child):
        child.wait_line("needle ready", 120)
        token = issue_token(data_dir)
        asyncio.run(visibility_load(port, token, rate, 3.0, sample))  # warm-up, not recorded
        nats_url = nats_url_from_conf(data_dir)
        waited = _quiesce(nats_url, 60)
        say(f"  {rate:.0f} reports/s for {duration_s:.0f} s, every {sample}th followed by GET with Needle-Min-Seq")
        r = asyncio.run(visibility_load(port, token, rate, duration_s, sample))
        r["worker_lag_after_run"], r["waited_for_workers_before_s"] = asyncio.run(_lag(nats_url)), waited
        logs = [*sorted((data_dir / "logs").glob("*.log")), child.log]
        r["error_lines"] = [ln for p in logs for ln in p.read_text(errors="replace").splitlines()
                            if "[error" in ln or "Traceback" in ln][:20]
    v = r["report_to_visible"]
    say(f"  report -> visible p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms, max {v['max_ms']} ms")
    return r


# -- all -----------------------------------------------------------------------------------------------------------
async def _servers_part(root: Path, events: int, profile: str, stats_issues: int, sample: int, reps: int,
                        say: Say) -> dict[str, Any]:
    embedded_nats, pg = EmbeddedNats(root / "bench-servers"), EmbeddedPostgres(root / "bench-servers")
    try:
        embedded_nats.start()
        await asyncio.to_thread(pg.start)
        async with await nats.connect(embedded_nats.url, pending_size=256 * 1024 * 1024) as nc:
            return {"rebuild": await bench_rebuild(nc, pg.url, events, profile, say),
                    "stats": await bench_stats(pg.url, stats_issues, sample, reps, say)}
    finally:
        pg.stop()
        embedded_nats.stop()


def run_projections_bench(*, events: int = 200_000, rate: float = 500.0, duration_s: float = 60.0, sample: int = 10,
                          stats_issues: int = 1_000_000, stats_sample: int = 20_000, reps: int = 50,
                          profile: str = "auto", workdir: Path | None = None, keep: bool = False,
                          say: Say = _quiet, only: str = "all") -> dict[str, Any]:
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="needle-bench-projections-"))
    root.mkdir(parents=True, exist_ok=True)
    if warning := busy_warning():
        say(f"WARNING: {warning}")
    result: dict[str, Any] = {"benchmark": "projections", "machine": machine(), "targets": TARGETS}
    try:
        if only != "visible":  # --only visible: the report -> visible run alone (no rebuild, no stats)
            result |= asyncio.run(_servers_part(root, events, profile, stats_issues, stats_sample, reps, say))
        result["visibility"] = bench_visibility(root, rate, duration_s, sample, say)
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return result
