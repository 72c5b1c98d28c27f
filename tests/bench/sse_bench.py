"""Measure GET /v1/events/stream (no assertions; numbers depend on the machine)::

    python -m tests.bench.sse_bench [--events 20000] [--clients 500]

Starts an embedded nats-server and ``needle run intake`` in their own processes, appends ``--events``
issue_reported events straight to the stream, then measures

* one SSE client reading the whole stream from the start: events/s, parsed line by line (as an
  integrator would) and counted as raw bytes (what the server can push);
* ``--clients`` idle SSE clients (``?live=true``): the intake process's RSS (and nats-server's) before,
  with them open, and after they disconnect, its CPU while they idle, and the JetStream consumer count.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats

from services.entrypoints.embedded import EmbeddedNats
from services.entrypoints.processes import free_port
from shared import auth
from shared.events import subjects as sj
from shared.events.models import IssueReported
from shared.store.eventstore import JetStreamEventStore

ROOT = Path(__file__).resolve().parents[2]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def populate(nats_url: str, n: int) -> int:
    nc = await nats.connect(nats_url)
    store = JetStreamEventStore(nc)
    await store.start()
    now = datetime.now(UTC)
    sem = asyncio.Semaphore(256)

    async def one(i: int) -> None:
        ev = IssueReported(grid="haibin-g1", category="construction_nuisance", title=f"bench {i}",
                           description="施工噪声 every night after 22:00, dust on the road", reporter="bench",
                           reported_at=now)
        async with sem:
            await store.append(f"01BENCH{i:019d}", [ev], expected_last_seq=0, version=0, now=now, actor="bench")

    await asyncio.gather(*(one(i) for i in range(n)))
    last = (await nc.jetstream().stream_info(sj.EVENTS_STREAM)).state.last_seq
    await nc.drain()
    return int(last)


async def read_all(base: str, token: str, last: int, *, parse: bool) -> tuple[int, float, int]:
    headers = {"Authorization": f"Bearer {token}"}
    n = nbytes = 0
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=120) as c, c.stream("GET", "/v1/events/stream",
                                                                            headers=headers) as r:
        if parse:
            async for line in r.aiter_lines():
                nbytes += len(line) + 1
                if line.startswith("id: "):
                    n += 1
                    if int(line[4:]) >= last:
                        break
        else:
            tail = b""
            async for chunk in r.aiter_raw():
                nbytes += len(chunk)
                buf = tail + chunk
                n += buf.count(b"\n\nid: ") + (1 if n == 0 and buf.startswith(b"id: ") else 0)
                tail = buf[-6:]
                if f"id: {last}\n".encode() in buf:
                    break
    return n, time.perf_counter() - t0, nbytes


async def idle_clients(base: str, token: str, count: int, pid: int, nats_pid: int, nats_url: str) -> dict[str, Any]:
    nc = await nats.connect(nats_url)

    async def consumers() -> int:
        return int((await nc.jetstream().stream_info(sj.EVENTS_STREAM)).state.consumer_count)

    out: dict[str, Any] = {"clients": count, "consumers_before": await consumers()}
    await asyncio.sleep(1)
    out["rss_before_kib"], out["nats_rss_before_kib"] = rss_kib(pid), rss_kib(nats_pid)
    opened = asyncio.Event()
    release = asyncio.Event()
    ready = 0
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:

        async def hold() -> None:
            nonlocal ready
            async with c.stream("GET", "/v1/events/stream", params={"live": "true"},
                                headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status_code == 200, r.status_code
                ready += 1
                if ready == count:
                    opened.set()
                await release.wait()

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(hold()) for _ in range(count)]
        await asyncio.wait_for(opened.wait(), 120)
        out["open_s"] = round(time.perf_counter() - t0, 2)
        await asyncio.sleep(3)
        out["consumers_open"] = await consumers()
        out["rss_open_kib"], out["nats_rss_open_kib"] = rss_kib(pid), rss_kib(nats_pid)
        c0, t1 = cpu_s(pid), time.perf_counter()
        await asyncio.sleep(10)
        out["idle_cpu_percent"] = round(100 * (cpu_s(pid) - c0) / (time.perf_counter() - t1), 1)
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(100):
        if await consumers() <= out["consumers_before"]:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(2)
    out["consumers_after"] = await consumers()
    out["rss_after_kib"], out["nats_rss_after_kib"] = rss_kib(pid), rss_kib(nats_pid)
    out["rss_growth_per_client_kib"] = round((out["rss_open_kib"] - out["rss_before_kib"]) / count, 1)
    await nc.drain()
    return out


async def bench(events: int, clients: int, data_dir: Path, rounds: int = 2) -> dict[str, Any]:
    key = auth.load_or_create_key(data_dir)
    token = auth.issue_token(key, role="integrator", scope="")
    nats_server = EmbeddedNats(data_dir)
    nats_server.start()
    assert nats_server.proc is not None
    port = free_port()
    env = os.environ | {"NEEDLE_NATS_URL": nats_server.url, "NEEDLE_LOG_LEVEL": "warning",
                        "NEEDLE_DATABASE_URL": "postgresql://unused@127.0.0.1:1/unused"}  # intake alone uses none
    proc = subprocess.Popen([sys.executable, "-m", "services.entrypoints.cli", "run", "intake",
                             "--data-dir", str(data_dir), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = ""
        for line in proc.stdout:
            if line.startswith("needle ready"):
                break
        base = line.split()[-1]
        t0 = time.perf_counter()
        last = await populate(nats_server.url, events)
        result: dict[str, Any] = {"events_in_stream": last, "populate_s": round(time.perf_counter() - t0, 1)}
        for parse in (True, False):
            n, secs, nbytes = await read_all(base, token, last, parse=parse)
            result["sse_parsed" if parse else "sse_raw"] = {
                "events": n, "seconds": round(secs, 2), "events_per_s": round(n / secs),
                "mb_per_s": round(nbytes / secs / 1e6, 1)}
        for r in range(rounds):  # a second round shows whether closed streams leave anything behind
            result[f"idle_round{r + 1}"] = await idle_clients(base, token, clients, proc.pid, nats_server.proc.pid,
                                                              nats_server.url)
        return result
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        if proc.poll() is None:
            proc.kill()
        nats_server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2, help="times the idle clients are opened and closed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="needle-sse-bench-") as d:
        print(json.dumps(asyncio.run(bench(args.events, args.clients, Path(d), args.rounds)), indent=2))


if __name__ == "__main__":
    main()
