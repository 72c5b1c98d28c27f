"""Helpers shared by the benchmarks: percentiles, machine facts, JSON output, stream counting."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nats
from nats.aio.client import DEFAULT_PENDING_SIZE
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from services.entrypoints.embedded import EmbeddedNats
from shared.store.streams import StreamOptions, ensure_streams


@contextlib.asynccontextmanager
async def scratch_nats(data_dir: Path, pending_size: int = DEFAULT_PENDING_SIZE
                      ) -> AsyncIterator[tuple[EmbeddedNats, NATS]]:
    """A nats-server of the benchmark's own in ``data_dir``, with needle's streams, and a connection to it
    (``pending_size``: the client's outgoing buffer, large for benchmarks that publish in bulk); both
    closed on the way out, the connection first. Stop child processes inside, before the server goes."""
    embedded = EmbeddedNats(data_dir)
    embedded.start()
    try:
        nc = await nats.connect(embedded.url, pending_size=pending_size)
        try:
            await ensure_streams(nc, StreamOptions())
            yield embedded, nc
        finally:
            await nc.close()
    finally:
        embedded.stop()


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (``pct`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[rank]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 4)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def busy_warning(cpus: int | None = None) -> str | None:
    """A warning when other work is running on this machine (the numbers will be noisy)."""
    load1 = os.getloadavg()[0]
    n = cpus or os.cpu_count() or 1
    if load1 > 0.5 * n:
        return f"machine is busy before the run (1-min load average {load1:.1f} on {n} CPUs): expect noisy numbers"
    return None


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def nats_url_from_conf(data_dir: Path) -> str:
    """The embedded nats-server's URL: ``listen:`` of ``DIR/nats/nats.conf``, with the services' user
    (``needle``) when the server was started with users (``DIR/secrets/nats.json``)."""
    text = (data_dir / "nats" / "nats.conf").read_text()
    m = re.search(r"^listen:\s*(\S+)", text, re.MULTILINE)
    if not m:
        raise RuntimeError(f"no listen: line in {data_dir / 'nats' / 'nats.conf'}")
    users = data_dir / "secrets" / "nats.json"
    if "authorization" in text and users.exists():
        password = json.loads(users.read_text())["needle"]
        return f"nats://needle:{quote(password, safe='')}@{m.group(1)}"
    return f"nats://{m.group(1)}"


class Counter:
    """Counts a stream's messages on a subject filter through an ephemeral consumer's num_pending
    (the consumer never receives anything, so pending == messages matching the filter)."""

    def __init__(self, js: JetStreamContext, stream: str, subject: str, *, start_seq: int | None = None) -> None:
        self.js, self.stream, self.subject, self.start_seq = js, stream, subject, start_seq
        self.name = f"bench-count-{uuid.uuid4().hex[:10]}"

    async def __aenter__(self) -> Counter:
        policy = DeliverPolicy.BY_START_SEQUENCE if self.start_seq else DeliverPolicy.ALL
        await self.js.add_consumer(self.stream, ConsumerConfig(
            name=self.name, durable_name=self.name, filter_subject=self.subject, deliver_policy=policy,
            opt_start_seq=self.start_seq, ack_policy=AckPolicy.NONE, inactive_threshold=300.0))
        return self

    async def count(self) -> int:
        info = await self.js.consumer_info(self.stream, self.name)
        return int(info.num_pending or 0)

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.js.delete_consumer(self.stream, self.name)


async def count_matching(js: JetStreamContext, stream: str, subject: str, start_seq: int | None = None) -> int:
    async with Counter(js, stream, subject, start_seq=start_seq) as c:
        return await c.count()


async def edge_message(js: JetStreamContext, stream: str, subject: str, *, last: bool,
                       start_seq: int | None = None) -> tuple[int, datetime] | None:
    """(stream sequence, stream timestamp) of the first (or last) message on ``subject``."""
    if last:
        policy = DeliverPolicy.LAST
    elif start_seq:
        policy = DeliverPolicy.BY_START_SEQUENCE
    else:
        policy = DeliverPolicy.ALL
    sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
        deliver_policy=policy, opt_start_seq=start_seq if policy == DeliverPolicy.BY_START_SEQUENCE else None,
        ack_policy=AckPolicy.NONE, inactive_threshold=60.0))
    try:
        msgs = await sub.fetch(1, timeout=5)
    except Exception as exc:
        if "Timeout" in type(exc).__name__:
            return None
        raise
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if not msgs:
        return None
    md = msgs[0].metadata
    return md.sequence.stream, md.timestamp


async def read_timestamps(js: JetStreamContext, stream: str, subject: str, *, start_seq: int,
                          expected: int, timeout: float = 30.0) -> list[tuple[str, datetime]]:
    """(subject, stream timestamp) of every message on ``subject`` from ``start_seq`` (up to ``expected``)."""
    sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq),
        ack_policy=AckPolicy.NONE, inactive_threshold=60.0, max_waiting=1))
    out: list[tuple[str, datetime]] = []
    try:
        misses = 0
        while len(out) < expected and misses < max(2, int(timeout)):
            try:
                msgs = await sub.fetch(1000, timeout=1)
            except Exception as exc:
                if "Timeout" not in type(exc).__name__:
                    raise
                misses += 1
                continue
            out.extend((m.subject, m.metadata.timestamp) for m in msgs)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


async def consumer_lag(js: JetStreamContext, stream: str) -> dict[str, int]:
    """Messages each durable consumer of ``stream`` has not yet processed (pending + unacked)."""
    out: dict[str, int] = {}
    for info in await js.consumers_info(stream):
        if info.name.startswith("bench-") or not info.config.durable_name:
            continue
        out[info.name] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
    return out
