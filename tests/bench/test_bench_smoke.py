"""Smoke tests for ``needle bench``: the benchmarks run at tiny sizes and produce every JSON key.

No timing assertions: numbers depend on the machine; only their presence and shape are checked.
The intake one starts `needle up` (embedded NATS + Postgres) and takes ~15 s; the router one ~5 s;
the timers one ~15 s (its SLA clock is 6 s)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from services.bench import loadgen
from services.bench.cli import intake_table, router_table
from services.bench.common import percentile, ratio, write_json
from services.bench.procs import Child, free_port, running

RUN_KEYS = {"label", "tool", "rps", "requests", "ok_2xx", "non_2xx", "p50_ms", "p90_ms", "p99_ms", "socket_errors",
            "duration_s", "connections"}


def test_percentile_and_ratio() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([5.0], 99) == 5.0
    assert ratio(50, 100) == 0.5
    assert ratio(None, 100) is None and ratio(1, 0) is None


def test_lua_script_has_keyed_requests_and_json_done() -> None:
    t = loadgen.Target(url="http://x/v1/issues", method="POST", body={"title": "it's \"quoted\""},
                       headers={"Authorization": "Bearer abc"}, fresh_key=True)
    lua = loadgen.lua_script(t, "nonce1")
    assert "wrk.method = 'POST'" in lua
    assert "Idempotency-Key" in lua and "request = function()" in lua and "thread:set('tid'" in lua
    assert "it\\'s" in lua
    assert loadgen.MARKER in lua and "latency:percentile(99)" in lua and "e.status" in lua
    plain = loadgen.lua_script(loadgen.Target(url="http://x/hello"), "n")
    assert "request = function()" not in plain


def test_python_fallback_against_the_baseline_app(tmp_path: Path) -> None:
    port = free_port()
    child = Child.start("baseline", [sys.executable, "-m", "services.bench.baseline_app", "--port", str(port)],
                        tmp_path / "baseline.log")
    with running(child):
        child.wait_http(f"http://127.0.0.1:{port}/hello", 30)
        t = loadgen.Target(url=f"http://127.0.0.1:{port}/echo", method="POST", fresh_key=True,
                           body={"grid": "g", "category": "c", "title": "t"}, label="echo")
        r = loadgen.run_python(t, duration_s=0.5, connections=2)
        bad = loadgen.run_python(loadgen.Target(url=f"http://127.0.0.1:{port}/echo", method="POST", body={"x": 1}),
                                 duration_s=0.3, connections=1)
    assert RUN_KEYS <= r.keys()
    assert r["requests"] > 0 and r["non_2xx"] == 0 and r["statuses"].keys() == {"201"}
    assert bad["requests"] > 0 and bad["non_2xx"] == bad["requests"]  # 422: counted as non-2xx


def test_wrk_missing_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.bench import intake

    said: list[str] = []
    monkeypatch.setattr(intake, "wrk_path", lambda: None)
    assert intake.choose_tool("auto", said.append) == "python"
    assert "apt-get install -y wrk" in said[0] and "LESS PRECISE" in said[0]
    with pytest.raises(RuntimeError, match="wrk not found"):
        intake.choose_tool("wrk", said.append)


def _check_intake(r: dict[str, Any]) -> None:
    assert {"benchmark", "machine", "load_generator", "baseline", "needle", "ratios", "stream_check",
            "needle_startup_s"} <= r.keys()
    for run in (r["baseline"]["hello"], r["baseline"]["echo"], r["needle"]["report"],
                r["needle"]["report_idempotent"]):
        assert RUN_KEYS <= run.keys()
        assert run["requests"] > 0
    for run in r["needle"].values():
        assert {"waited_for_workers_before_s", "worker_lag_after_run"} <= run.keys()
    assert set(r["ratios"]) == {"report_vs_hello", "report_vs_echo", "report_idempotent_vs_hello",
                                "report_idempotent_vs_echo"}
    chk = r["stream_check"]
    assert set(chk["per_run"]) == {"report", "report_idempotent"}
    for c in chk["per_run"].values():
        assert {"acked_201", "found_in_stream", "in_flight_at_stop", "ok"} <= c.keys()
    assert chk["ok"], chk  # every 201 is an issue_reported event in the stream
    assert r["needle"]["report"]["non_2xx"] == 0 and r["needle"]["report_idempotent"]["non_2xx"] == 0
    intake_table(r)


@pytest.mark.slow  # restart/fault or bench smoke: `pytest -m slow`
def test_intake_bench_tiny(tmp_path: Path) -> None:
    from services.bench.intake import run_intake_bench

    r = run_intake_bench(duration_s=1, connections=4, threads=1, warmup_s=0, workdir=tmp_path, rounds=2)
    _check_intake(r)
    assert r["rounds_measured"] == 2 and len(r["rounds"]) == 2
    for rnd in r["rounds"]:  # each round is a whole measurement of its own, with its own ratios
        assert set(rnd["ratios"]) == set(r["ratios"]) and rnd["stream_check"]["ok"]
        report = rnd["needle"]["report"]  # divided by the hello run measured right before it
        assert RUN_KEYS <= report["paired_hello"].keys()
        assert rnd["ratios"]["report_vs_hello"] == round(report["rps"] / report["paired_hello"]["rps"], 4)
    per_round = [rnd["ratios"]["report_vs_hello"] for rnd in r["rounds"]]
    assert r["ratio_ranges"]["report_vs_hello"] == [min(per_round), max(per_round)]
    assert r["needle"]["report"]["rps_per_round"] == [rnd["needle"]["report"]["rps"] for rnd in r["rounds"]]
    assert r["needle"]["report"]["ok_2xx"] == sum(rnd["needle"]["report"]["ok_2xx"] for rnd in r["rounds"])
    out = write_json(tmp_path / "bench-intake.json", r)
    assert json.loads(out.read_text())["benchmark"] == "intake"


def test_router_bench_tiny(tmp_path: Path) -> None:
    from services.bench.router import run_router_bench

    r = run_router_bench(issues=100, rate=50, latency_s=1, workdir=tmp_path)
    assert {"benchmark", "machine", "issues", "baseline", "needle", "latency", "ratio_routed_vs_raw",
            "router_log"} <= r.keys()
    assert {"per_s", "messages", "stream_span_s", "window", "batch"} <= r["baseline"].keys()
    n = r["needle"]
    assert {"routed_per_s", "issues_routed", "tasks_dispatched", "events_written_per_issue",
            "router_startup_s", "router_drained"} <= n.keys()
    assert n["issues_routed"] == 100  # every report routed (contract rules: lead + co task)
    assert n["tasks_dispatched"] == 200
    lat = r["latency"]
    assert lat["reports"] == 50 and lat["dispatched"] == 50
    for key in ("report_to_dispatched_stream", "report_to_dispatched_subscriber"):
        assert {"p50_ms", "p90_ms", "p99_ms", "max_ms"} <= lat[key].keys()
    assert r["ratio_routed_vs_raw"] is not None
    router_table(r)
    json.dumps(r, default=str)


@pytest.mark.slow  # restart/fault or bench smoke: `pytest -m slow`
def test_timers_bench_tiny(tmp_path: Path) -> None:
    from services.bench.timers import run_timers_bench, timers_table

    r = run_timers_bench(tasks=40, ack_s=6, baseline=20, grace_s=15, workdir=tmp_path, rate=100)
    assert {"benchmark", "machine", "tasks", "acknowledge_s", "baseline", "needle", "edges", "after", "samples",
            "router_log"} <= r.keys()
    assert r["baseline"]["schedules"] == 20 and {"fired", "fire_spread_s", "stored_after_at"} <= r["baseline"].keys()
    assert {"pending_schedules", "pending_schedules_max", "router_max_rss_mb", "nats_max_rss_mb",
            "all_scheduled_before_first_edge"} <= r["needle"].keys()
    assert r["needle"]["tasks_dispatched"] == 40
    for kind in ("warn", "breach"):
        e = r["edges"][kind]
        assert e["expected"] == 40 and e["stored"] == 40  # every ack warn and breach recorded
        for key in ("lag_event_time", "lag_incl_unrecorded", "lag_seen_by_subscriber"):
            assert {"p50_ms", "p99_ms", "max_ms"} <= e[key].keys()
    timers_table(r)
    json.dumps(r, default=str)


@pytest.mark.slow  # restart/fault or bench smoke: `pytest -m slow`
def test_projections_bench_tiny(tmp_path: Path) -> None:
    from services.bench.cli import projections_table
    from services.bench.projections import run_projections_bench

    r = run_projections_bench(events=2000, rate=20, duration_s=1, sample=4, stats_issues=10_000, stats_sample=200,
                              reps=3, profile="yes", workdir=tmp_path)
    rb, v, st = r["rebuild"], r["visibility"], r["stats"]
    assert {"fill", "baseline", "baseline_fetch_ack", "needle", "ratio_vs_raw", "ratio_vs_fetch_ack", "meets",
            "rows_ok", "profiled_run"} <= rb.keys()
    assert rb["rows_ok"] and rb["baseline"]["events"] == rb["fill"]["events"] == rb["needle"]["events"]
    assert rb["baseline_fetch_ack"]["events"] == rb["fill"]["events"]
    assert rb["needle"]["in_child_process"] and rb["needle"]["spills"] == 0
    assert {"read", "decode_fold_s", "waited_for_audit_copy_s", "finish_copy_s"} <= rb["needle"]["split_s"].keys()
    assert rb["profiled_run"]["top_tottime"] and rb["profiled_run"]["events_per_s_under_cprofile"] > 0
    assert v["statuses"] == {"201": 20} and v["report_to_visible"]["n"] == v["created_to_visible"]["n"] == 5
    assert {"p50_ms", "p99_ms", "max_ms"} <= v["report_to_visible"].keys() and "generator_cpu_s" in v
    assert st["district_reported"] == 10_000 and st["query"]["n"] == 3 and st["baseline_select_1"]["n"] == 3
    projections_table(r)
    json.dumps(r, default=str)


def _run(rps: float, p99: float, ok: int, errors: dict[str, int]) -> dict[str, Any]:
    return {"label": "x", "rps": rps, "requests": ok, "ok_2xx": ok, "non_2xx": 0, "p50_ms": p99 / 2, "p90_ms": p99,
            "p99_ms": p99, "mean_ms": p99 / 3, "max_ms": p99 * 2, "socket_errors": errors}


def test_rounds_combine_into_medians_of_their_own_ratios() -> None:
    from services.bench.intake import combine_rounds

    def rnd(hello: float, report: float, ok: bool = True) -> dict[str, Any]:
        check = {"per_run": {"report": {"acked_201": 10, "found_in_stream": 11, "in_flight_at_stop": 1, "ok": ok}},
                 "total_issue_reported_in_stream": 10, "ok": ok}
        return {"baseline": {"hello": _run(hello, 4.0, 100, {})},
                "needle": {"report": _run(report, 9.0, 10, {"timeout": 1})}, "stream_check": check,
                "ratios": {"report_vs_hello": report / hello}}

    # a machine that slows down between rounds: the rates of the whole run (8000/6000) would say 0.75,
    # the rounds say 0.6 each time
    out = combine_rounds([rnd(10_000, 6_000), rnd(6_000, 3_600), rnd(8_000, 4_800, ok=False)])
    assert out["ratios"]["report_vs_hello"] == 0.6
    assert out["ratio_ranges"]["report_vs_hello"] == [0.6, 0.6]
    report = out["needle"]["report"]
    assert report["rps"] == 4_800 and report["rps_per_round"] == [6_000, 3_600, 4_800]
    assert report["ok_2xx"] == 30 and report["max_ms"] == 18.0 and report["socket_errors"] == {"timeout": 3}
    assert out["baseline"]["hello"]["rps"] == 8_000
    check = out["stream_check"]
    assert check["per_run"]["report"] == {"acked_201": 30, "found_in_stream": 33, "in_flight_at_stop": 3, "ok": False}
    assert check["ok"] is False
