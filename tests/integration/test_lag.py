"""Consumer lag read from a real JetStream (shared/store/lag.py): messages behind and the age of the
oldest one, for a durable with several filter subjects, a checkpoint reader, and pending timers."""
from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig

from shared.events import subjects as sj
from shared.store import lag
from shared.store.streams import ensure_streams


async def test_lag_of_a_filtered_durable_a_checkpoint_and_pending_timers(nats_factory: Any) -> None:
    nc = await nats.connect(nats_factory().url)
    try:
        await ensure_streams(nc)
        js = nc.jetstream()
        assert (await lag.consumer_lag(nc, sj.EVENTS_STREAM, "router")).present is False
        sub = await js.pull_subscribe("", durable="router", stream=sj.EVENTS_STREAM, config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, filter_subjects=[sj.events_of_type("a"), sj.events_of_type("b")]))
        await js.publish(sj.issue_event("I1", "other"), b"{}")  # not the consumer's: never counted
        await js.publish(sj.issue_event("I1", "a"), b"{}")
        await js.publish(sj.issue_event("I2", "b"), b"{}")
        now = time.time() + 5
        got = await lag.consumer_lag(nc, sj.EVENTS_STREAM, "router", now=now)
        assert got.messages == 2 and 4.0 < got.seconds < 10.0
        cp = await lag.checkpoint_lag(nc, 1, now=now)  # a reader at seq 1 of 3
        assert cp.messages == 2 and 4.0 < cp.seconds < 10.0
        for m in await sub.fetch(2, timeout=2):
            await m.ack_sync()
        assert await lag.consumer_lag(nc, sj.EVENTS_STREAM, "router") == lag.Lag(0, 0.0)
        assert await lag.checkpoint_lag(nc, 3) == lag.Lag(0, 0.0)

        at = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        for task in ("T1", "T2"):
            await js.publish(sj.timer_schedule(task), b"{}", headers={
                "Nats-Schedule": f"@at {at}", "Nats-Schedule-Target": sj.timer_fired(task)})
        assert await lag.timers_pending(nc) == 2
    finally:
        await nc.close()
