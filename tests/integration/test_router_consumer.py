"""The router's durable consumer filters ONE wildcard (``needle.events.issue.>``) and picks its types
client-side (nats-server 2.15's multi-filter consumers cost O(subjects in the block) per message). A
router upgraded over the durable of an earlier one (five ``filter_subjects``) updates it in place, keeping
its place and the rest of its configuration, and reacts as before."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.router.service import ROUTER_FILTER
from shared.events import subjects as sj
from shared.store.streams import ensure_streams
from tests.support import events, of_type, report

OLD_TYPES = ("issue_escalated", "issue_reopened", "issue_reported", "task_dispatched", "task_returned")


async def test_an_earlier_routers_multi_filter_durable_is_updated_in_place(
        nats_factory: Callable[[], Any], needle_factory: Callable[..., Any]) -> None:
    server = nats_factory()
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await ensure_streams(nc)
        await js.add_consumer(sj.EVENTS_STREAM, ConsumerConfig(
            name="router", durable_name="router", ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=7, max_ack_pending=20_000, max_deliver=-1,
            filter_subjects=[sj.events_of_type(t) for t in OLD_TYPES]))

        h = await needle_factory(nats_url=server.url, services=("intake", "router"))
        info = await js.consumer_info(sj.EVENTS_STREAM, "router")
        assert info.config.filter_subject == ROUTER_FILTER
        assert not info.config.filter_subjects
        assert info.config.ack_wait == 7  # the rest of the configuration is kept

        issue_id = await report(h, "road_damage")
        for _ in range(100):
            evs = await events(h, issue_id)
            if of_type(evs, "needle.task.dispatched.v1"):
                break
            await asyncio.sleep(0.1)
        assert len(of_type(evs, "needle.issue.routed.v1")) == 1
        assert len(of_type(evs, "needle.task.dispatched.v1")) == 2
        # every issue event was delivered to the router and acked, the ones it does not react to included
        for _ in range(100):
            info = await js.consumer_info(sj.EVENTS_STREAM, "router")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.1)
        assert info.num_pending == 0 and info.num_ack_pending == 0
        assert info.delivered.stream_seq >= 4  # reported, routed and both dispatches
    finally:
        await nc.close()
