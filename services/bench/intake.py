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

from .common import count_matching, machine, nats_url_from_conf, ratio
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


def run_intake_bench(*, duration_s: float = 15.0, connections: int = 32, threads: int = 2, warmup_s: float = 2.0,
                     tool: str = "auto", workdir: Path | None = None, keep: bool = False,
                     say: Say = _quiet) -> dict[str, Any]:
    """Run the whole intake benchmark; returns every number (see tests/bench/README.md)."""
    tool = choose_tool(tool, say)
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="needle-bench-intake-"))
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "intake", "machine": machine(), "load_generator": tool,
        "precise": tool == "wrk", "duration_s": duration_s, "warmup_s": warmup_s,
        "connections": connections, "threads": threads if tool == "wrk" else 1, "workers": 1,
    }

    def load(t: Target, secs: float) -> dict[str, Any]:
        return run_load(t, tool=tool, duration_s=secs, connections=connections, threads=threads, workdir=root)

    def measure(t: Target) -> dict[str, Any]:
        if warmup_s > 0:
            load(dataclasses.replace(t, label=t.label + "-warmup"), warmup_s)
        say(f"  {t.label}: {duration_s:.0f} s at {connections} connections ...")
        r = load(t, duration_s)
        say(f"  {t.label}: {r['rps']:.0f} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, non-2xx {r['non_2xx']}")
        return r

    try:
        # -- baseline ---------------------------------------------------------------------------------
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        say(f"baseline: bare FastAPI + uvicorn (1 worker) on {base}")
        argv = [sys.executable, "-m", "services.bench.baseline_app", "--port", str(port)]
        baseline = Child.start("baseline app", argv, root / "logs" / "baseline.log")
        with running(baseline):
            baseline.wait_http(f"{base}/hello", 30)
            hello = measure(Target(url=f"{base}/hello", label="baseline-hello"))
            echo = measure(Target(url=f"{base}/echo", method="POST", body=REPORT_BODY, label="baseline-echo"))
        result["baseline"] = {"hello": hello, "echo": echo}

        # -- needle -----------------------------------------------------------------------------------
        data_dir = root / "needle-data"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        say(f"needle: `needle up` on {url} (data dir {data_dir})")
        t0 = time.monotonic()
        needle = Child.start("needle up", needle_argv("up", "--data-dir", str(data_dir), "--port", str(port),
                                                      "--org", str(CONTRACT_ORG), "--rules", str(CONTRACT_RULES)),
                             root / "logs" / "needle-up.log", env={"NEEDLE_LOG_LEVEL": "warning"})
        with running(needle):
            needle.wait_line("needle ready", 120)
            result["needle_startup_s"] = round(time.monotonic() - t0, 2)
            token = issue_token(data_dir)
            headers = {"Authorization": f"Bearer {token}"}
            nats_url = nats_url_from_conf(data_dir)
            report = Target(url=f"{url}/v1/issues", method="POST", body=REPORT_BODY, headers=headers,
                            label="needle-report")
            keyed = Target(url=f"{url}/v1/issues", method="POST", body=REPORT_BODY, headers=headers,
                           fresh_key=True, label="needle-report-idempotent")
            runs: dict[str, dict[str, Any]] = {}
            check: dict[str, Any] = {"per_run": {}}
            for name, target in (("report", report), ("report_idempotent", keyed)):
                if warmup_s > 0:
                    load(dataclasses.replace(target, label=target.label + "-warmup"), warmup_s)
                time.sleep(0.5)
                before = asyncio.run(_count_reported(nats_url))
                say(f"  {target.label}: {duration_s:.0f} s at {connections} connections ...")
                r = load(target, duration_s)
                say(f"  {target.label}: {r['rps']:.0f} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                    f"non-2xx {r['non_2xx']}")
                time.sleep(1.0)  # let requests that were in flight when the generator stopped finish
                after = asyncio.run(_count_reported(nats_url))
                runs[name] = r
                found = after - before
                # a request in flight when the generator stops is written but never counted as a 201
                check["per_run"][name] = {"acked_201": r["ok_2xx"], "found_in_stream": found,
                                          "in_flight_at_stop": found - r["ok_2xx"],
                                          "ok": r["ok_2xx"] <= found <= r["ok_2xx"] + connections}
            check["total_issue_reported_in_stream"] = asyncio.run(_count_reported(nats_url))
            check["ok"] = all(v["ok"] for v in check["per_run"].values())
            log_text = needle.tail(1_000_000)
            errors = [ln for ln in log_text.splitlines() if "[error" in ln or "Traceback" in ln or "Error:" in ln]
            result["needle_log"] = {"path": str(needle.log), "error_lines": errors[:20]}
        result["needle"] = runs
        result["stream_check"] = check
        result["ratios"] = {
            f"{name}_vs_{b}": ratio(runs[name]["rps"], result["baseline"][b]["rps"])
            for name in runs for b in ("hello", "echo")
        }
        return result
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)
