"""The integrator NATS user reads the event stream and nothing else."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import nats
import pytest
from nats.js.api import ConsumerConfig

from shared.domain.ids import new_issue_id
from shared.events import subjects as sj
from shared.events.models import IssueReported
from shared.store.eventstore import JetStreamEventStore
from shared.store.streams import ensure_streams


async def _seeded(nats_factory: Callable[[], Any]) -> tuple[Any, str]:
    server = nats_factory()
    nc = await nats.connect(server.url)
    await ensure_streams(nc)
    store = JetStreamEventStore(nc)
    await store.start()
    now = datetime.now(UTC)
    issue = new_issue_id(1, 1)
    await store.append(issue, [IssueReported(grid="g", category="c", title="t", reporter="r", reported_at=now)],
                       expected_last_seq=0, version=0, now=now)
    await nc.close()
    return server, issue


async def test_integrator_reads_events_with_its_own_durable_consumer(nats_factory: Callable[[], Any]) -> None:
    server, issue = await _seeded(nats_factory)
    nc = await nats.connect(server.integrator_url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(sj.ALL_EVENTS, durable="warehouse", stream=sj.EVENTS_STREAM,
                                      config=ConsumerConfig(ack_wait=10))
        msgs = await sub.fetch(1, timeout=5)
        assert msgs[0].subject == sj.issue_event(issue, "issue_reported")
        await msgs[0].ack()
    finally:
        await nc.close()


async def test_integrator_cannot_publish_into_the_event_stream(nats_factory: Callable[[], Any]) -> None:
    server, issue = await _seeded(nats_factory)
    nc = await nats.connect(server.integrator_url, error_cb=_ignore)
    try:
        with pytest.raises(Exception):  # noqa: B017 - no responders / permissions violation / timeout
            await nc.jetstream().publish(sj.issue_event(issue, "issue_closed"), b"{}", timeout=1)
    finally:
        await nc.close()
    admin = await nats.connect(server.url)
    try:
        info = await admin.jetstream().stream_info(sj.EVENTS_STREAM)
        assert info.state.messages == 1  # nothing was written
    finally:
        await admin.close()


async def test_integrator_cannot_read_the_timers_stream(nats_factory: Callable[[], Any]) -> None:
    server, _ = await _seeded(nats_factory)
    nc = await nats.connect(server.integrator_url, error_cb=_ignore)
    try:
        js = nc.jetstream(timeout=1)
        with pytest.raises(Exception):  # noqa: B017
            await js.stream_info(sj.TIMERS_STREAM)
        with pytest.raises(Exception):  # noqa: B017
            await js.pull_subscribe(sj.TIMER_FIRED, durable="peek", stream=sj.TIMERS_STREAM)
    finally:
        await nc.close()


async def _ignore(_: Exception) -> None:
    return None


async def test_integrator_cannot_touch_needles_own_consumers(nats_factory: Callable[[], Any]) -> None:
    server, _ = await _seeded(nats_factory)
    admin = await nats.connect(server.url)
    await admin.jetstream().pull_subscribe(sj.ALL_EVENTS, durable="projections", stream=sj.EVENTS_STREAM)
    nc = await nats.connect(server.integrator_url, error_cb=_ignore)
    try:
        js = nc.jetstream(timeout=1)
        with pytest.raises(Exception):  # noqa: B017
            await js.delete_consumer(sj.EVENTS_STREAM, "projections")
        with pytest.raises(Exception):  # noqa: B017
            sub = await js.pull_subscribe(sj.ALL_EVENTS, durable="projections", stream=sj.EVENTS_STREAM)
            await sub.fetch(1, timeout=1)
    finally:
        await nc.close()
    info = await admin.jetstream().consumer_info(sj.EVENTS_STREAM, "projections")
    assert info.name == "projections"
    await admin.close()


async def test_integrator_has_no_core_subscription_to_the_event_subjects(nats_factory: Callable[[], Any]) -> None:
    server, _ = await _seeded(nats_factory)
    errors: list[Exception] = []

    async def on_error(e: Exception) -> None:
        errors.append(e)

    nc = await nats.connect(server.integrator_url, error_cb=on_error)
    try:
        await nc.subscribe(sj.ALL_EVENTS)
        await nc.flush(timeout=2)
        for _ in range(20):
            if errors:
                break
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    assert any("permissions violation" in str(e).lower() for e in errors), errors


async def test_integrator_cannot_read_residents_keys(nats_factory: Callable[[], Any]) -> None:
    """Residents' data keys live outside the event stream, out of integrators' reach."""
    from shared.privacy.keystore import BUCKET, KV_STREAM, ResidentKeys

    server, _ = await _seeded(nats_factory)
    admin = await nats.connect(server.url)
    keys = ResidentKeys(admin)
    await keys.start(watch=False)
    made = await keys.key_for_id("res_perm")
    assert (await keys.lookup("res_perm")) == made  # the needle user reads it
    nc = await nats.connect(server.integrator_url, error_cb=_ignore)
    try:
        js = nc.jetstream(timeout=0.5)  # a denial answers at once or times out
        with pytest.raises(Exception):  # noqa: B017
            await js.stream_info(KV_STREAM)
        with pytest.raises(Exception):  # noqa: B017
            await (await js.key_value(BUCKET)).get("r.res_perm")
        with pytest.raises(Exception):  # noqa: B017
            await js.get_msg(KV_STREAM, seq=1, direct=True)
        with pytest.raises(Exception):  # noqa: B017
            await js.pull_subscribe(f"$KV.{BUCKET}.>", durable="peek", stream=KV_STREAM)
    finally:
        await nc.close()
        await keys.close()
        await admin.close()
