"""The router baseline: raw JetStream consume + publish on the same nats-server.

The least a router must do per issue: fetch the report from a durable pull consumer, publish
one message (awaiting its JetStream ack, with a window of concurrent publishes, as the router
does with its semaphore), and ack the consumed message. No decoding, no state load, no rules."""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from .common import edge_message

STREAM = "BENCH_RAW"
IN, OUT = "bench.raw.in", "bench.raw.out"


async def ensure_raw_stream(nc: NATS) -> None:
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream(STREAM)
    # the same storage settings as NEEDLE_EVENTS (file, limits, replicas 1)
    await js.add_stream(name=STREAM, subjects=["bench.raw.>"],
                        storage="file", retention="limits", num_replicas=1)


async def publish_backlog(nc: NATS, n: int, payload: bytes, window: int = 256) -> float:
    """Publish ``n`` messages to ``bench.raw.in.<i>``; returns messages per second."""
    js = nc.jetstream()
    sem = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with sem:
            await js.publish(f"{IN}.{i}", payload, stream=STREAM)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t0)


async def consume_publish(nc: NATS, n: int, *, batch: int = 256, window: int = 64, timeout: float = 300.0
                          ) -> dict[str, Any]:
    """Drain ``n`` backlog messages: fetch, publish one message per message (acks awaited), ack."""
    js = nc.jetstream()
    sub = await js.pull_subscribe(f"{IN}.>", durable="bench-raw", stream=STREAM, config=ConsumerConfig(
        ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=30, max_ack_pending=20_000))
    sem = asyncio.Semaphore(window)
    done = 0

    async def one(m: Msg) -> None:
        nonlocal done
        async with sem:
            await js.publish(OUT + m.subject[len(IN):], m.data, stream=STREAM)
            await m.ack()
            done += 1

    t0 = time.perf_counter()
    deadline = t0 + timeout
    first_seq = (await js.stream_info(STREAM)).state.last_seq + 1
    while done < n and time.perf_counter() < deadline:
        try:
            msgs = await sub.fetch(batch, timeout=1)
        except Exception as exc:
            if "Timeout" in type(exc).__name__:
                continue
            raise
        await asyncio.gather(*(one(m) for m in msgs))
    wall = time.perf_counter() - t0
    first = await edge_message(js, STREAM, f"{OUT}.>", last=False, start_seq=first_seq)
    last = await edge_message(js, STREAM, f"{OUT}.>", last=True)
    span = (last[1] - first[1]).total_seconds() if first and last else 0.0
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
    return {
        "messages": done, "wall_s": round(wall, 3), "stream_span_s": round(span, 3),
        # N outputs between the first and the last output's stream timestamps (same rule as the router's number)
        "per_s": round(done / span, 1) if span > 0 else round(done / wall, 1),
        "per_s_wall": round(done / wall, 1) if wall > 0 else None,
        "batch": batch, "window": window,
    }


async def raw_baseline(nc: NATS, n: int, payload: bytes) -> dict[str, Any]:
    await ensure_raw_stream(nc)
    backlog_rate = await publish_backlog(nc, n, payload)
    result = await consume_publish(nc, n)
    result["backlog_publish_per_s"] = round(backlog_rate, 1)
    result["payload_bytes"] = len(payload)
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_stream(STREAM)
    return result
