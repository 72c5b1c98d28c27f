"""``needle bench intake``: POST /v1/issues on ``needle up`` against a bare FastAPI baseline.

1. baseline: ``services.bench.baseline_app`` in a subprocess; ``GET /hello`` and ``POST /echo``.
2. needle: ``needle up`` on a fresh data dir with the contract org/rules; ``POST /v1/issues``
   once without and once with a fresh ``Idempotency-Key`` per request.
3. check: every 201 is an ``issue_reported`` event in NEEDLE_EVENTS (read from the stream)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.events import subjects as sj

from .common import busy_warning, consumer_lag, count_matching, machine, nats_url_from_conf, ratio
from .loadgen import WRK_INSTALL_HINT, Target, run_load, wrk_path
from .procs import CATEGORY, CONTRACT_ORG, CONTRACT_RULES, GRID, Child, free_port, issue_token, needle_argv, running

REPORT_BODY = {"grid": GRID, "category": CATEGORY, "title": "bench: pothole on the main road"}
Say = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


def choose_tool(prefer: str = "auto", say: Say = _quiet) -> str:
    if prefer == "python":
        return "python"
    if wrk_path() is None:
        say(WRK_INSTALL_HINT)
        if prefer == "wrk":
            raise RuntimeError(WRK_INSTALL_HINT)
        return "python"
    return "wrk"


async def _count_reported(nats_url: str) -> int:
    import nats

    nc = await nats.connect(nats_url)
    try:
        return await count_matching(nc.jetstream(), sj.EVENTS_STREAM, sj.events_of_type("issue_reported"))
    finally:
        await nc.close()


async def _lag(nats_url: str) -> dict[str, int]:
    import nats

    nc = await nats.connect(nats_url)
    try:
        return await consumer_lag(nc.jetstream(), sj.EVENTS_STREAM)
    finally:
        await nc.close()


def _quiesce(nats_url: str, timeout: float = 300.0) -> float:
    """Wait until the router and projections have caught up (so runs start from a quiet system)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and any(asyncio.run(_lag(nats_url)).values()):
        time.sleep(0.5)
    return round(time.monotonic() - t0, 1)


def _log_errors(child: Child) -> dict[str, Any]:
    text = child.tail(1_000_000)
    errors = [ln for ln in text.splitlines() if "[error" in ln or "Traceback" in ln or "Error:" in ln]
    return {"path": str(child.log), "error_lines": errors[:20]}


class _Runner:
    """Warm-up + measured runs with one load generator and one set of settings."""

    def __init__(self, tool: str, duration_s: float, warmup_s: float, connections: int, threads: int,
                 workdir: Path, say: Say, workers: int = 1) -> None:
        self.workers = workers
        self.tool, self.duration_s, self.warmup_s = tool, duration_s, warmup_s
        self.connections, self.threads, self.workdir, self.say = connections, threads, workdir, say

    def load(self, t: Target, secs: float) -> dict[str, Any]:
        return run_load(t, tool=self.tool, duration_s=secs, connections=self.connections, threads=self.threads,
                        workdir=self.workdir)

    def warm(self, t: Target) -> None:
        if self.warmup_s > 0:
            self.load(dataclasses.replace(t, label=t.label + "-warmup"), self.warmup_s)

    def measure(self, t: Target) -> dict[str, Any]:
        self.say(f"  {t.label}: {self.duration_s:.0f} s at {self.connections} connections ...")
        r = self.load(t, self.duration_s)
        self.say(f"  {t.label}: {r['rps']:.0f} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                 f"non-2xx {r['non_2xx']}")
        return r

    def needle_runs(self, needle: _Needle, prefix: str, hello: Target | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """POST /v1/issues without and with a fresh Idempotency-Key; check every 201 against the stream.
        ``hello``: measured right before each run, as the run's own baseline (``paired_hello``)."""
        url, nats_url = needle.url, needle.nats_url
        headers = {"Authorization": f"Bearer {issue_token(needle.data_dir)}"}
        targets = {
            "report": Target(url=f"{url}/v1/issues", method="POST", body=REPORT_BODY, headers=headers,
                             label=f"{prefix}-report"),
            "report_idempotent": Target(url=f"{url}/v1/issues", method="POST", body=REPORT_BODY, headers=headers,
                                        fresh_key=True, label=f"{prefix}-report-idempotent"),
        }
        runs: dict[str, Any] = {}
        check: dict[str, Any] = {"per_run": {}}
        for name, target in targets.items():
            self.warm(target)
            waited = _quiesce(nats_url)
            if waited >= 1:
                self.say(f"  waited {waited} s for the router/projections to catch up before the run")
            paired = self.measure(hello) if hello is not None else None
            before = asyncio.run(_count_reported(nats_url))
            r = runs[name] = self.measure(target)
            if paired is not None:
                r["paired_hello"] = paired
            r["waited_for_workers_before_s"] = waited
            r["worker_lag_after_run"] = asyncio.run(_lag(nats_url))
            if any(r["worker_lag_after_run"].values()):
                self.say(f"  behind after the run (events not yet processed): {r['worker_lag_after_run']}")
            time.sleep(1.0)  # let requests that were in flight when the generator stopped finish
            found = asyncio.run(_count_reported(nats_url)) - before
            # a request in flight when the generator stops is written but never counted as a 201
            check["per_run"][name] = {"acked_201": r["ok_2xx"], "found_in_stream": found,
                                      "in_flight_at_stop": found - r["ok_2xx"],
                                      "ok": r["ok_2xx"] <= found <= r["ok_2xx"] + self.connections}
        check["total_issue_reported_in_stream"] = asyncio.run(_count_reported(nats_url))
        check["ok"] = all(v["ok"] for v in check["per_run"].values())
        return runs, check


@dataclasses.dataclass(frozen=True)
class _Needle:
    """A running needle under test: where to send reports and where to count them."""

    url: str
    data_dir: Path
    nats_url: str
    child: Child


def _start_needle_up(stack: contextlib.ExitStack, r: _Runner, root: Path, say: Say) -> tuple[_Needle, float]:
    data_dir = root / "needle-data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    say(f"needle: `needle up` on {url} (data dir {data_dir})")
    t0 = time.monotonic()
    child = stack.enter_context(running(Child.start(
        "needle up", needle_argv("up", "--data-dir", str(data_dir), "--port", str(port), "--org", str(CONTRACT_ORG),
                                 "--rules", str(CONTRACT_RULES)),
        root / "logs" / "needle-up.log", env={"NEEDLE_LOG_LEVEL": "warning", "NEEDLE_WORKERS": str(r.workers)})))
    child.wait_line("needle ready", 120)
    return _Needle(url, data_dir, nats_url_from_conf(data_dir), child), round(time.monotonic() - t0, 2)


def _start_intake_alone(stack: contextlib.ExitStack, r: _Runner, root: Path, say: Say) -> _Needle:
    """Diagnostic: `needle run intake` alone (no router, no projections in its process)."""
    from services.entrypoints.embedded import EmbeddedNats

    nats_server = EmbeddedNats(root / "alone-nats")
    nats_server.start()
    stack.callback(nats_server.stop)
    data_dir = root / "alone-data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    say(f"diagnostic: `needle run intake` alone on {url} (own nats-server, no router/projections)")
    env = {"NEEDLE_NATS_URL": nats_server.url, "NEEDLE_ORG": str(CONTRACT_ORG),
           "NEEDLE_RULES": str(CONTRACT_RULES), "NEEDLE_LOG_LEVEL": "warning", "NEEDLE_WORKERS": str(r.workers)}
    child = stack.enter_context(running(Child.start(
        "needle run intake", needle_argv("run", "intake", "--data-dir", str(data_dir), "--port", str(port)),
        root / "logs" / "intake-alone.log", env=env)))
    child.wait_line("needle ready", 120)
    return _Needle(url, data_dir, nats_server.url, child)


def _start_baseline(stack: contextlib.ExitStack, root: Path, say: Say, workers: int = 1) -> str:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    say(f"baseline: bare FastAPI + uvicorn ({workers} worker{'s' if workers > 1 else ''}) on {base}")
    argv = [sys.executable, "-m", "services.bench.baseline_app", "--port", str(port), "--workers", str(workers)]
    log = root / "logs" / f"baseline-{workers}.log"
    baseline = stack.enter_context(running(Child.start("baseline app", argv, log)))
    baseline.wait_http(f"{base}/hello", 30)
    return base


def _baseline_runs(r: _Runner, base: str, workers: int, echo: bool) -> dict[str, Any]:
    hello_t = Target(url=f"{base}/hello", label=f"baseline-hello-{workers}")
    r.warm(hello_t)
    out = {"hello": r.measure(hello_t)}
    if echo:
        echo_t = Target(url=f"{base}/echo", method="POST", body=REPORT_BODY, label="baseline-echo")
        r.warm(echo_t)
        out["echo"] = r.measure(echo_t)
    return out


def base_of(run: dict[str, Any], rnd: dict[str, Any], base: str) -> dict[str, Any]:
    """The baseline run a needle run is divided by: for hello the one measured right before it, if any."""
    if base == "hello" and "paired_hello" in run:
        return run["paired_hello"]
    return rnd["baseline"][base]


def _ratios(rnd: dict[str, Any], bases: tuple[str, ...]) -> dict[str, float | None]:
    out = {f"{name}_vs_{b}": ratio(run["rps"], base_of(run, rnd, b)["rps"])
           for name, run in rnd["needle"].items() for b in bases}
    if "intake_alone" in rnd:
        out.update({f"alone_{name}_vs_{b}": ratio(run["rps"], base_of(run, rnd, b)["rps"])
                    for name, run in rnd["intake_alone"]["runs"].items() for b in bases})
    return out


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run standing for the same run in several rounds: the median rate and latencies, the summed
    counts, the worst maximum; anything else (labels, lag figures, raw output) as in the last round."""
    out = dict(runs[-1])
    for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "mean_ms"):
        values = [run[key] for run in runs if run.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    for key in ("requests", "ok_2xx", "non_2xx"):
        out[key] = sum(run[key] for run in runs)
    maxima = [run["max_ms"] for run in runs if run.get("max_ms") is not None]
    out["max_ms"] = max(maxima) if maxima else None
    errors: dict[str, int] = {}
    for run in runs:
        for kind, n in run["socket_errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    out["socket_errors"] = errors
    out["rps_per_round"] = [run["rps"] for run in runs]
    return out


def combine_checks(checks: list[dict[str, Any]]) -> dict[str, Any]:
    per_run: dict[str, dict[str, Any]] = {}
    for check in checks:
        for name, c in check["per_run"].items():
            acc = per_run.setdefault(name, {"acked_201": 0, "found_in_stream": 0, "in_flight_at_stop": 0, "ok": True})
            for key in ("acked_201", "found_in_stream", "in_flight_at_stop"):
                acc[key] += c[key]
            acc["ok"] = acc["ok"] and c["ok"]
    return {"per_run": per_run, "total_issue_reported_in_stream": checks[-1]["total_issue_reported_in_stream"],
            "ok": all(c["ok"] for c in checks)}


def combine_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The result's top level from its rounds: ``ratios`` are the medians of the rounds' own ratios (each
    needle run divided by its paired hello, or by its round's baseline), ``ratio_ranges`` their lowest and
    highest."""
    first = rounds[0]
    out: dict[str, Any] = {
        "baseline": {name: combine_runs([rnd["baseline"][name] for rnd in rounds]) for name in first["baseline"]},
        "needle": {name: combine_runs([rnd["needle"][name] for rnd in rounds]) for name in first["needle"]},
        "stream_check": combine_checks([rnd["stream_check"] for rnd in rounds]),
    }
    if "intake_alone" in first:
        out["intake_alone"] = {
            "runs": {name: combine_runs([rnd["intake_alone"]["runs"][name] for rnd in rounds])
                     for name in first["intake_alone"]["runs"]},
            "stream_check": combine_checks([rnd["intake_alone"]["stream_check"] for rnd in rounds])}
    ratios: dict[str, float | None] = {}
    ranges: dict[str, list[float]] = {}
    for key in first["ratios"]:
        values = [v for rnd in rounds if (v := rnd["ratios"][key]) is not None]
        ratios[key] = round(statistics.median(values), 4) if values else None
        if values:
            ranges[key] = [min(values), max(values)]
    out["ratios"], out["ratio_ranges"] = ratios, ranges
    return out


def run_intake_bench(*, duration_s: float = 15.0, connections: int = 32, threads: int = 2, warmup_s: float = 2.0,
                     tool: str = "auto", alone: bool = False, workdir: Path | None = None, keep: bool = False,
                     workers: int = 1, rounds: int = 1, say: Say = _quiet) -> dict[str, Any]:
    """Run the whole intake benchmark; returns every number (see tests/bench/README.md). ``workers``:
    NEEDLE_WORKERS for needle; the baseline is measured with 1 uvicorn worker, and also with ``workers``
    when more than one (ratios against both). Every server starts once, then ``rounds`` times: the
    baseline, and each needle run right after a hello run of its own (``paired_hello``, the divisor of
    its ratio to hello), so the two runs of a ratio are seconds apart: on a shared machine the rate of
    the same server drifts by a third within minutes."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    tool = choose_tool(tool, say)
    if warning := busy_warning():
        say(f"WARNING: {warning}")
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="needle-bench-intake-"))
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "intake", "machine": machine(), "load_generator": tool,
        "precise": tool == "wrk", "duration_s": duration_s, "warmup_s": warmup_s,
        "connections": connections, "threads": threads if tool == "wrk" else 1, "workers": workers,
        "rounds_measured": rounds,
    }
    r = _Runner(tool, duration_s, warmup_s, connections, threads, root, say, workers=workers)
    bases: tuple[str, ...] = ("hello", "echo", "hello_workers") if workers > 1 else ("hello", "echo")
    try:
        with contextlib.ExitStack() as stack:
            base = _start_baseline(stack, root, say)
            base_n = _start_baseline(stack, root, say, workers) if workers > 1 else None
            up, result["needle_startup_s"] = _start_needle_up(stack, r, root, say)
            solo = _start_intake_alone(stack, r, root, say) if alone else None
            # measured again right before each needle run: the two runs of a ratio are seconds apart
            hello = Target(url=f"{base}/hello", label="baseline-hello-paired")
            measured: list[dict[str, Any]] = []
            for i in range(rounds):
                if rounds > 1:
                    say(f"round {i + 1} of {rounds}")
                # needle up's router and projections work off the last round's reports before anything is measured
                _quiesce(up.nats_url)
                rnd: dict[str, Any] = {"baseline": _baseline_runs(r, base, 1, echo=True)}
                if base_n is not None:
                    rnd["baseline"]["hello_workers"] = _baseline_runs(r, base_n, workers, echo=False)["hello"]
                rnd["needle"], rnd["stream_check"] = r.needle_runs(up, "needle", hello)
                if solo is not None:
                    _quiesce(up.nats_url)
                    runs, check = r.needle_runs(solo, "alone", hello)
                    rnd["intake_alone"] = {"runs": runs, "stream_check": check}
                rnd["ratios"] = _ratios(rnd, bases)
                measured.append(rnd)
            result.update(combine_rounds(measured))
            result["rounds"] = measured
            result["needle_log"] = _log_errors(up.child)
            if solo is not None:
                result["intake_alone"]["log"] = _log_errors(solo.child)
        return result
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)
