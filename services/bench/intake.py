"""``needle bench intake``: POST /v1/issues on ``needle up`` against a bare FastAPI baseline.

1. baseline: ``services.bench.baseline_app`` in a subprocess; ``GET /hello`` and ``POST /echo``.
2. needle: ``needle up`` on a fresh data dir with the contract org/rules; ``POST /v1/issues``
   once without and once with a fresh ``Idempotency-Key`` per request.
3. check: every 201 is an ``issue_reported`` event in NEEDLE_EVENTS (read from the stream)."""
from __future__ import annotations

import asyncio
import dataclasses
import shutil
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

    def needle_runs(self, url: str, data_dir: Path, nats_url: str, prefix: str
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """POST /v1/issues without and with a fresh Idempotency-Key; check every 201 against the stream."""
        headers = {"Authorization": f"Bearer {issue_token(data_dir)}"}
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
            before = asyncio.run(_count_reported(nats_url))
            r = runs[name] = self.measure(target)
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


def _needle_up(r: _Runner, root: Path, say: Say) -> dict[str, Any]:
    data_dir = root / "needle-data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    say(f"needle: `needle up` on {url} (data dir {data_dir})")
    t0 = time.monotonic()
    child = Child.start("needle up", needle_argv("up", "--data-dir", str(data_dir), "--port", str(port), "--org",
                                                 str(CONTRACT_ORG), "--rules", str(CONTRACT_RULES)),
                        root / "logs" / "needle-up.log",
                        env={"NEEDLE_LOG_LEVEL": "warning", "NEEDLE_WORKERS": str(r.workers)})
    with running(child):
        child.wait_line("needle ready", 120)
        startup = round(time.monotonic() - t0, 2)
        runs, check = r.needle_runs(url, data_dir, nats_url_from_conf(data_dir), "needle")
        return {"runs": runs, "stream_check": check, "startup_s": startup, "log": _log_errors(child)}


def _intake_alone(r: _Runner, root: Path, say: Say) -> dict[str, Any]:
    """Diagnostic: `needle run intake` alone (no router, no projections in its process)."""
    from shared.runtime.embedded import EmbeddedNats

    nats_server = EmbeddedNats(root / "alone-nats")
    nats_server.start()
    try:
        data_dir = root / "alone-data"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        say(f"diagnostic: `needle run intake` alone on {url} (own nats-server, no router/projections)")
        env = {"NEEDLE_NATS_URL": nats_server.url, "NEEDLE_ORG": str(CONTRACT_ORG),
               "NEEDLE_RULES": str(CONTRACT_RULES), "NEEDLE_LOG_LEVEL": "warning", "NEEDLE_WORKERS": str(r.workers)}
        child = Child.start("needle run intake", needle_argv("run", "intake", "--data-dir", str(data_dir), "--port",
                                                             str(port)), root / "logs" / "intake-alone.log", env=env)
        with running(child):
            child.wait_line("needle ready", 120)
            runs, check = r.needle_runs(url, data_dir, nats_server.url, "alone")
            return {"runs": runs, "stream_check": check, "log": _log_errors(child)}
    finally:
        nats_server.stop()


def _baseline(r: _Runner, root: Path, say: Say, workers: int = 1) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    say(f"baseline: bare FastAPI + uvicorn ({workers} worker{'s' if workers > 1 else ''}) on {base}")
    argv = [sys.executable, "-m", "services.bench.baseline_app", "--port", str(port), "--workers", str(workers)]
    baseline = Child.start("baseline app", argv, root / "logs" / f"baseline-{workers}.log")
    with running(baseline):
        baseline.wait_http(f"{base}/hello", 30)
        hello_t = Target(url=f"{base}/hello", label=f"baseline-hello-{workers}")
        r.warm(hello_t)
        out = {"hello": r.measure(hello_t)}
        if workers == 1:
            echo_t = Target(url=f"{base}/echo", method="POST", body=REPORT_BODY, label="baseline-echo")
            r.warm(echo_t)
            out["echo"] = r.measure(echo_t)
        return out


def run_intake_bench(*, duration_s: float = 15.0, connections: int = 32, threads: int = 2, warmup_s: float = 2.0,
                     tool: str = "auto", alone: bool = False, workdir: Path | None = None, keep: bool = False,
                     workers: int = 1, say: Say = _quiet) -> dict[str, Any]:
    """Run the whole intake benchmark; returns every number (see tests/bench/README.md). ``workers``:
    NEEDLE_WORKERS for needle; the baseline is measured with 1 uvicorn worker, and also with ``workers``
    when more than one (ratios against both)."""
    tool = choose_tool(tool, say)
    if warning := busy_warning():
        say(f"WARNING: {warning}")
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="needle-bench-intake-"))
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "intake", "machine": machine(), "load_generator": tool,
        "precise": tool == "wrk", "duration_s": duration_s, "warmup_s": warmup_s,
        "connections": connections, "threads": threads if tool == "wrk" else 1, "workers": workers,
    }
    r = _Runner(tool, duration_s, warmup_s, connections, threads, root, say, workers=workers)
    try:
        result["baseline"] = _baseline(r, root, say)
        bases: tuple[str, ...] = ("hello", "echo")
        if workers > 1:
            result["baseline"]["hello_workers"] = _baseline(r, root, say, workers)["hello"]
            bases = ("hello", "echo", "hello_workers")

        up = _needle_up(r, root, say)
        result["needle"] = up["runs"]
        result["stream_check"] = up["stream_check"]
        result["needle_startup_s"] = up["startup_s"]
        result["needle_log"] = up["log"]
        result["ratios"] = {f"{name}_vs_{b}": ratio(run["rps"], result["baseline"][b]["rps"])
                            for name, run in up["runs"].items() for b in bases}
        if alone:
            result["intake_alone"] = _intake_alone(r, root, say)
            result["ratios"].update({f"alone_{name}_vs_{b}": ratio(run["rps"], result["baseline"][b]["rps"])
                                     for name, run in result["intake_alone"]["runs"].items()
                                     for b in bases})
        return result
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)
