"""``needle bench intake|router|timers``: run a benchmark, print a table, write every number as JSON."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Benchmarks, reported as ratios to a baseline measured in the same run on this machine.",
                  no_args_is_help=True, add_completion=False)
console = Console(width=max(Console().width, 120))  # the tables stay readable in a pipe


_T0 = time.monotonic()


def _say(msg: str) -> None:
    console.print(f"[dim]{time.monotonic() - _T0:6.1f}s {msg}[/dim]", highlight=False)


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def intake_table(r: dict[str, Any]) -> Table:
    from .common import ratio
    from .intake import base_of

    rounds = r.get("rounds") or [r]
    t = Table(min_width=100, title=f"needle bench intake — {r['load_generator']}, {r['connections']} connections, "
                    f"{r['duration_s']:.0f} s × {len(rounds)} round{'s' if len(rounds) > 1 else ''}, "
                    f"{r['machine']['cpus']} CPUs, needle workers: {r.get('workers', 1)}")
    t.add_column("run (median of the rounds)" if len(rounds) > 1 else "run", no_wrap=True)
    for col in ("req/s", "vs hello", "lowest–highest", "vs echo", "p50 ms", "p99 ms", "non-2xx", "sock err"):
        t.add_column(col, justify="right")
    rows: list[tuple[str, tuple[str, ...]]] = [
        ("baseline GET /hello", ("baseline", "hello")), ("baseline POST /echo", ("baseline", "echo")),
        *([(f"baseline GET /hello, {r['workers']} workers", ("baseline", "hello_workers"))]
          if "hello_workers" in r["baseline"] else []),
        ("needle up: POST /v1/issues", ("needle", "report")),
        ("needle up: + Idempotency-Key", ("needle", "report_idempotent"))]
    if "intake_alone" in r:
        rows += [("intake alone: POST /v1/issues", ("intake_alone", "runs", "report")),
                 ("intake alone: + Idempotency-Key", ("intake_alone", "runs", "report_idempotent"))]
    for name, path in rows:
        run = _at(r, path)
        per_round = [(_at(rnd, path), rnd) for rnd in rounds]
        vs_hello = [x for one, rnd in per_round
                    if (x := ratio(one["rps"], base_of(one, rnd, "hello")["rps"])) is not None]
        vs_echo = [x for one, rnd in per_round if (x := ratio(one["rps"], rnd["baseline"]["echo"]["rps"])) is not None]
        spread = f"{min(vs_hello):.3f}–{max(vs_hello):.3f}" if len(vs_hello) > 1 else ""
        t.add_row(name, _f(run["rps"]), _f(statistics.median(vs_hello) if vs_hello else None, 3), spread,
                  _f(statistics.median(vs_echo) if vs_echo else None, 3), _f(run["p50_ms"], 2),
                  _f(run["p99_ms"], 2), _f(run["non_2xx"]), _f(sum(run["socket_errors"].values())))
    return t


def _at(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        d = d[key]
    return d


def router_table(r: dict[str, Any]) -> Table:
    b, n, lat = r["baseline"], r["needle"], r["latency"]
    t = Table(title=f"needle bench router — {r['issues']:,} issues, {r['machine']['cpus']} CPUs")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("baseline: raw JetStream fetch+publish+ack (msg/s)", _f(b["per_s"]))
    t.add_row("needle: issues routed+dispatched (issues/s)", _f(n["routed_per_s"]))
    t.add_row("ratio needle / raw", _f(r["ratio_routed_vs_raw"], 4))
    t.add_row("events written by the router per issue", _f(n["events_written_per_issue"], 2))
    t.add_row("issues routed / tasks dispatched", f"{n['issues_routed']:,} / {n['tasks_dispatched']:,}")
    s, c = lat["report_to_dispatched_stream"], lat["report_to_dispatched_subscriber"]
    t.add_row(f"offered {lat['offered_rate_per_s']:.0f}/s for {lat['duration_s']:.0f} s (achieved)",
              _f(lat["achieved_offer_rate_per_s"]))
    t.add_row("report → dispatched p50 / p99 ms (stream time)", f"{_f(s['p50_ms'], 2)} / {_f(s['p99_ms'], 2)}")
    t.add_row("report → first task_dispatched on core NATS p50 / p99 ms",
              f"{_f(c['p50_ms'], 2)} / {_f(c['p99_ms'], 2)}")
    t.add_row("dispatched / reports", f"{lat['dispatched']:,} / {lat['reports']:,}")
    t.add_row("task_dispatched seen on core NATS / stored in the stream",
              f"{lat['task_dispatched_core_messages']:,} / {lat['task_dispatched_stored']:,}")
    t.add_row("router redeliveries (throughput run / latency run)",
              f"{n['router_redeliveries']:,} / {lat['router_redeliveries']:,}")
    return t


def visibility_table(r: dict[str, Any]) -> Table:
    """The report→visible part alone (``--only visible``)."""
    v, tg = r["visibility"], r["targets"]
    vis, cv = v["report_to_visible"], v["created_to_visible"]
    t = Table(title=f"needle bench projections --only visible — {r['machine']['cpus']} CPUs")
    for col, justify in (("measure", "left"), ("value", "right"), ("target", "right")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    t.add_row(f"POST /v1/issues at {v['rate']:.0f}/s for {v['duration_s']:.0f} s: achieved offer rate / statuses",
              f"{_f(v['achieved_offer_rate_per_s'])} / {v['statuses']}", "")
    t.add_row("POST latency p50 / p99 ms", f"{_f(v['post']['p50_ms'], 2)} / {_f(v['post']['p99_ms'], 2)}", "")
    t.add_row(f"report → visible (Needle-Min-Seq) p50 / p99 / max ms, n={vis['n']}",
              f"{_f(vis['p50_ms'], 2)} / {_f(vis['p99_ms'], 2)} / {_f(vis['max_ms'], 2)}",
              f"p99 < {tg['visible_p99_ms']}")
    t.add_row("  of which from the 201 to the answer p50 / p99 ms (read side alone)",
              f"{_f(cv['p50_ms'], 2)} / {_f(cv['p99_ms'], 2)}", "")
    return t


def projections_table(r: dict[str, Any]) -> Table:
    rb, v, st, tg = r["rebuild"], r["visibility"], r["stats"], r["targets"]
    vis, q = v["report_to_visible"], st["query"]
    t = Table(title=f"needle bench projections — {r['machine']['cpus']} CPUs")
    for col, justify in (("measure", "left"), ("value", "right"), ("target", "right"), ("met", "center")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]

    def ok(good: bool) -> str:
        return "[green]yes[/green]" if good else "[red]NO[/red]"

    t.add_row(f"stream filled: events / issues (append_many {rb['fill']['publish_per_s']:,.0f}/s)",
              f"{rb['fill']['events']:,} / {rb['fill']['issues']:,}", "", "")
    t.add_row("baseline: the rebuild's reader alone, no decoding (events/s)", _f(rb["baseline"]["per_s"]), "", "")
    t.add_row("baseline: durable fetch(1000) + ack (events/s)", _f(rb["baseline_fetch_ack"]["per_s"]), "", "")
    t.add_row("needle: rebuild() into a fresh database (events/s)", _f(rb["needle"]["events_per_s"]),
              f"≥ {tg['rebuild_per_s']:,}", ok(rb["meets"]["per_s"]))
    t.add_row("ratio rebuild / reader alone; / fetch+ack",
              f"{_f(rb['ratio_vs_raw'], 3)}; {_f(rb['ratio_vs_fetch_ack'], 3)}", f"≥ {tg['rebuild_vs_raw']}",
              ok(rb["meets"]["vs_raw"]))
    split = rb["needle"]["split_s"]
    t.add_row("rebuild s: reading / (child) decode+fold, waited for audit COPY, final COPY",
              f"{split['read']} / {split['decode_fold_s']}, {split['waited_for_audit_copy_s']}, "
              f"{split['finish_copy_s']}", "", "")
    t.add_row(f"POST /v1/issues at {v['rate']:.0f}/s for {v['duration_s']:.0f} s: achieved offer rate / statuses",
              f"{_f(v['achieved_offer_rate_per_s'])} / {v['statuses']}", "", "")
    t.add_row("POST latency p50 / p99 ms", f"{_f(v['post']['p50_ms'], 2)} / {_f(v['post']['p99_ms'], 2)}", "", "")
    t.add_row("load generator: CPU s / lateness at start p99 ms",
              f"{v['generator_cpu_s']} / {_f(v['late_at_start']['p99_ms'], 2)}", "", "")
    t.add_row(f"report → visible (Needle-Min-Seq) p50 / p99 / max ms, n={vis['n']}",
              f"{_f(vis['p50_ms'], 2)} / {_f(vis['p99_ms'], 2)} / {_f(vis['max_ms'], 2)}",
              f"p99 < {tg['visible_p99_ms']}", ok(vis["p99_ms"] is not None and vis["p99_ms"] < tg["visible_p99_ms"]))
    cv = v["created_to_visible"]
    t.add_row("  of which from the 201 to the answer p50 / p99 ms (read side alone)",
              f"{_f(cv['p50_ms'], 2)} / {_f(cv['p99_ms'], 2)}", "", "")
    t.add_row(f"stats_daily rows for {st['issues']:,} issues ({st['district']}); reported in the window",
              f"{st['generation']['bucket_rows']:,}; {st['district_reported']:,}", "", "")
    t.add_row("baseline: SELECT 1 p50 / p99 ms",
              f"{_f(st['baseline_select_1']['p50_ms'], 2)} / {_f(st['baseline_select_1']['p99_ms'], 2)}", "", "")
    t.add_row(f"queries.stats over {st['window_days']} days p50 / p99 ms",
              f"{_f(q['p50_ms'], 2)} / {_f(q['p99_ms'], 2)}", f"< {tg['stats_p99_ms']}",
              ok(q["p99_ms"] is not None and q["p99_ms"] < tg["stats_p99_ms"]))
    return t


def _write(out: Path, result: dict[str, Any]) -> None:
    from .common import write_json

    write_json(out, result)
    console.print(f"wrote {out}")


@app.command()
def intake(
    duration: Annotated[float, typer.Option(help="seconds per measured run")] = 15.0,
    connections: Annotated[int, typer.Option(help="concurrent connections")] = 32,
    threads: Annotated[int, typer.Option(help="wrk threads")] = 2,
    warmup: Annotated[float, typer.Option(help="seconds of unrecorded load before each run")] = 2.0,
    tool: Annotated[str, typer.Option(help="auto | wrk | python (asyncio+httpx, less precise)")] = "auto",
    out: Annotated[Path, typer.Option(help="JSON output")] = Path("artifacts/bench-intake.json"),
    alone: Annotated[bool, typer.Option("--alone", help="also measure `needle run intake` alone (diagnostic: "
                                                         "no router/projections in its process)")] = False,
    keep: Annotated[bool, typer.Option("--keep", help="keep the temp data dir and logs")] = False,
    workers: Annotated[int, typer.Option(help="NEEDLE_WORKERS for needle; with more than 1 the baseline is "
                                              "also measured with that many uvicorn workers", min=1)] = 1,
    rounds: Annotated[int, typer.Option(help="baseline then needle, this many times over the same servers; the "
                                             "ratios are the medians of the rounds' own", min=1)] = 3,
) -> None:
    """POST /v1/issues on `needle up` vs a bare FastAPI app (GET /hello, POST /echo), same uvicorn settings."""
    from .intake import run_intake_bench

    result = run_intake_bench(duration_s=duration, connections=connections, threads=threads, warmup_s=warmup,
                              tool=tool, alone=alone, keep=keep, workers=workers, rounds=rounds,
                              say=_say)
    console.print(intake_table(result))
    if not result["precise"]:
        console.print("[yellow]load generator: Python asyncio+httpx — LESS PRECISE than wrk (install wrk)[/yellow]")
    chk = result["stream_check"]
    checks = dict(chk["per_run"])
    if "intake_alone" in result:
        checks.update({f"alone {k}": v for k, v in result["intake_alone"]["stream_check"]["per_run"].items()})
    for name, c in checks.items():
        style = "green" if c["ok"] else "red"
        console.print(f"[{style}]{name}: acked writes found in the stream: {c['found_in_stream']:,} "
                      f"for {c['acked_201']:,} 201s ({c['in_flight_at_stop']} in flight when the load stopped)"
                      f"[/{style}]")
    if result["needle_log"]["error_lines"]:
        console.print(f"[red]needle logged errors during the run[/red] (see {result['needle_log']['path']}):")
        for line in result["needle_log"]["error_lines"][:5]:
            console.print(f"  {line}", highlight=False, markup=False)
    _write(out, result)
    if not all(c["ok"] for c in checks.values()):
        raise typer.Exit(1)


@app.command()
def router(
    issues: Annotated[int, typer.Option(help="backlog of reports to route")] = 20_000,
    rate: Annotated[float, typer.Option(help="offered reports/s for the latency run")] = 500.0,
    latency_duration: Annotated[float, typer.Option("--latency-duration", help="seconds of the latency run")] = 20.0,
    out: Annotated[Path, typer.Option(help="JSON output")] = Path("artifacts/bench-router.json"),
    keep: Annotated[bool, typer.Option("--keep", help="keep the temp data dir and logs")] = False,
) -> None:
    """Router throughput (issues routed/s vs raw JetStream consume+publish) and report→dispatched latency."""
    from .router import run_router_bench

    result = run_router_bench(issues=issues, rate=rate, latency_s=latency_duration, keep=keep, say=_say)
    console.print(router_table(result))
    if result["router_log"]["error_lines"]:
        console.print(f"[red]the router logged errors[/red] (see {result['router_log']['path']}):")
        for line in result["router_log"]["error_lines"][:5]:
            console.print(f"  {line}", highlight=False, markup=False)
    _write(out, result)
    n = result["needle"]
    lat = result["latency"]
    phantoms = lat["task_dispatched_core_messages"] - lat["task_dispatched_stored"]
    if phantoms > 0:
        console.print(f"[yellow]a core NATS subscriber saw {phantoms:,} task_dispatched messages that the stream "
                      "never stored (refused atomic batches)[/yellow]")
    if n["issues_routed"] < issues or lat["dispatched"] < lat["reports"]:
        console.print("[red]not every report was dispatched[/red]")
        raise typer.Exit(1)


@app.command()
def timers(
    tasks: Annotated[int, typer.Option(help="timers to hold: tasks dispatched (2 per report)")] = 100_000,
    ack_seconds: Annotated[int | None, typer.Option("--ack-seconds", help="acknowledge clock X in seconds "
                                                    "(default: from a calibrated router rate)")] = None,
    baseline: Annotated[int | None, typer.Option(help="raw schedules in the baseline (default min(tasks, "
                                                 "100000); 0 skips it)")] = None,
    grace: Annotated[float, typer.Option(help="seconds to wait past the last breach edge")] = 60.0,
    rate: Annotated[float | None, typer.Option(help="reports per second, open loop (default: as fast as "
                                               "possible: every edge due within the dispatch burst)")] = None,
    out: Annotated[Path, typer.Option(help="JSON output")] = Path("artifacts/bench-timers.json"),
    keep: Annotated[bool, typer.Option("--keep", help="keep the temp data dir and logs")] = False,
) -> None:
    """N durable SLA timers in `needle run router`: pending schedules, RSS, and lag of the warn/breach edges."""
    from .timers import run_timers_bench, timers_table

    result = run_timers_bench(tasks=tasks, ack_s=ack_seconds, baseline=baseline, grace_s=grace, keep=keep, say=_say,
                              rate=rate)
    console.print(timers_table(result))
    if result["router_log"]["error_lines"]:
        console.print(f"[red]the router logged errors[/red] (see {result['router_log']['path']}):")
        for line in result["router_log"]["error_lines"][:5]:
            console.print(f"  {line}", highlight=False, markup=False)
    _write(out, result)
    if any(e["stored"] < e["expected"] for e in result["edges"].values()):
        console.print("[red]not every edge was recorded[/red]")
        raise typer.Exit(1)


@app.command()
def projections(
    events: Annotated[int, typer.Option(help="events to fill NEEDLE_EVENTS with for the rebuild")] = 200_000,
    rate: Annotated[float, typer.Option(help="reports/s offered for the visibility run")] = 500.0,
    duration: Annotated[float, typer.Option(help="seconds of the visibility run")] = 60.0,
    stats_issues: Annotated[int, typer.Option("--stats-issues", help="issues behind the stats buckets")] = 1_000_000,
    profile: Annotated[str, typer.Option(help="cProfile a second rebuild: auto (when a target is missed) | yes | no")
                       ] = "auto",
    out: Annotated[Path, typer.Option(help="JSON output")] = Path("artifacts/bench-projections.json"),
    keep: Annotated[bool, typer.Option("--keep", help="keep the temp data dir and logs")] = False,
    only: Annotated[str, typer.Option(help="run one part: all | visible (report→visible alone, minutes faster)")
                    ] = "all",
) -> None:
    """Rebuild events/s vs raw fetch+ack, report→visible latency at a fixed rate, and GET /v1/stats at 1M issues."""
    from .projections import run_projections_bench

    if only not in ("all", "visible"):
        raise typer.BadParameter("--only: all | visible")
    result = run_projections_bench(events=events, rate=rate, duration_s=duration, stats_issues=stats_issues,
                                   profile=profile, keep=keep, say=_say, only=only)
    if only == "visible":
        console.print(visibility_table(result))
        _write(out, result)
        return
    console.print(projections_table(result))
    if prof := result["rebuild"].get("profiled_run"):
        console.print(f"cProfile of a second rebuild ({prof['events_per_s_under_cprofile']:,.0f} events/s under the "
                      f"profiler), top own time of {prof['total_tottime_s']} s:")
        for f in prof["top_tottime"][:12]:
            console.print(f"  {f['tottime_s']:7.3f} s {f['calls']:>9,} {f['function']}", highlight=False, markup=False)
    if result["visibility"]["error_lines"]:
        console.print("[red]needle logged errors during the visibility run[/red]:")
        for line in result["visibility"]["error_lines"][:5]:
            console.print(f"  {line}", highlight=False, markup=False)
    _write(out, result)
    if not result["rebuild"]["rows_ok"] or result["stats"]["district_reported"] != result["stats"]["issues"]:
        console.print("[red]the read models do not hold what was written[/red]")
        raise typer.Exit(1)


def main(args: list[str]) -> None:
    """Entry point for ``needle bench ...`` (services/entrypoints/cli.py delegates here)."""
    app(args=args, prog_name="needle bench")
