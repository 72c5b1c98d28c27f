"""NEEDLE_TIMERS on a real nats-server: work-queue retention keeps it bounded (a fired timer is gone once the
router acks it), and a limits-retention stream left by an earlier version is recreated by ``ensure_streams``
without losing a pending timer (JetStream refuses to change a retention to work-queue in place)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.events import subjects as sj
from shared.store.streams import StreamOptions, _create_or_update, ensure_streams, timers_stream_config
from shared.store.timers_migration import BACKUP_ROOT, BACKUP_STREAM, migrate_timers_stream, stream_info

FAR = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")


async def subjects(nc: NATS, stream: str) -> dict[str, int]:
    info = await nc.jetstream().stream_info(stream, subjects_filter=">")
    return dict(info.state.subjects or {})


async def schedule(nc: NATS, key: str, at: str, body: bytes = b"{}") -> None:
    await nc.jetstream().publish(sj.timer_schedule(key), body, headers={
        "Nats-Schedule": f"@at {at}", "Nats-Schedule-Target": sj.timer_fired(key)})


async def old_timers_stream(nc: NATS) -> None:
    """NEEDLE_TIMERS as earlier versions made it: limits retention, fired copies kept forever; the router's
    consumer has handled the first fired timer and not the second; two schedules are pending."""
    await _create_or_update(nc, {**timers_stream_config(StreamOptions()), "retention": "limits"})
    js = nc.jetstream()
    await js.publish(sj.timer_fired("done-1"), b'{"task": "done-1"}')
    await js.publish(sj.timer_fired("todo-1"), b'{"task": "todo-1"}')
    sub = await js.pull_subscribe(sj.TIMER_FIRED, durable="router-timers", stream=sj.TIMERS_STREAM,
                                  config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                                        deliver_policy=DeliverPolicy.ALL))
    (first,) = await sub.fetch(1, timeout=5)
    assert first.subject == sj.timer_fired("done-1")
    await first.ack_sync()
    await schedule(nc, "task-1", FAR, b'{"task": "task-1", "at": "x"}')
    await schedule(nc, "issue-2", FAR, b'{"issue": "issue-2", "at": "y"}')
    await sub.unsubscribe()


async def test_a_limits_timers_stream_is_recreated_as_a_work_queue_keeping_its_timers(
        nats_factory: Callable[[], Any]) -> None:
    nc = await nats.connect(nats_factory().url)
    try:
        await old_timers_stream(nc)
        assert len(await subjects(nc, sj.TIMERS_STREAM)) == 4

        await ensure_streams(nc)

        info = await stream_info(nc, sj.TIMERS_STREAM)
        assert info is not None and info["config"]["retention"] == "workqueue"
        assert info["config"]["allow_msg_schedules"] is True
        assert await stream_info(nc, BACKUP_STREAM) is None
        # the pending schedules, as they were; the fired timer not acknowledged; not the handled one
        assert await subjects(nc, sj.TIMERS_STREAM) == {
            sj.timer_schedule("task-1"): 1, sj.timer_schedule("issue-2"): 1, sj.timer_fired("todo-1"): 1}
        js = nc.jetstream()
        kept = await js.get_last_msg(sj.TIMERS_STREAM, sj.timer_schedule("task-1"))
        assert kept.data == b'{"task": "task-1", "at": "x"}'
        assert kept.headers is not None
        assert kept.headers["Nats-Schedule"] == f"@at {FAR}"
        assert kept.headers["Nats-Schedule-Target"] == sj.timer_fired("task-1")
        # a second start changes nothing
        await ensure_streams(nc)
        assert len(await subjects(nc, sj.TIMERS_STREAM)) == 3
    finally:
        await nc.close()


async def test_processes_starting_at_once_migrate_once(nats_factory: Callable[[], Any]) -> None:
    # given an old stream, and needle up's three processes starting together on it
    url = nats_factory().url
    nc = await nats.connect(url)
    others = [await nats.connect(url) for _ in range(2)]
    try:
        await old_timers_stream(nc)
        results = await asyncio.gather(*(migrate_timers_stream(c, timers_stream_config(StreamOptions()))
                                         for c in (nc, *others)))
        assert sorted(results) == [False, False, True]  # one of them migrated, the others waited for it
        assert await subjects(nc, sj.TIMERS_STREAM) == {
            sj.timer_schedule("task-1"): 1, sj.timer_schedule("issue-2"): 1, sj.timer_fired("todo-1"): 1}
        assert await stream_info(nc, BACKUP_STREAM) is None
    finally:
        for c in (nc, *others):
            await c.close()


async def test_an_interrupted_migration_is_finished_at_the_next_start(nats_factory: Callable[[], Any]) -> None:
    # given a start that died after deleting the old stream: only the backup holds the pending timer
    nc = await nats.connect(nats_factory().url)
    try:
        await _create_or_update(nc, {"name": BACKUP_STREAM, "subjects": [f"{BACKUP_ROOT}.>"], "storage": "file",
                                     "retention": "limits", "num_replicas": 1})
        await nc.jetstream().publish(f"{BACKUP_ROOT}.1", b'{"issue": "i"}', headers={
            "Needle-Subject": sj.timer_schedule("i"), "Needle-Schedule": f"@at {FAR}",
            "Needle-Schedule-Target": sj.timer_fired("i")})
        # (its owner is gone: the backup stops moving, and is taken over after ``stall_s``)
        assert await migrate_timers_stream(nc, timers_stream_config(StreamOptions()), stall_s=0.5)
        await ensure_streams(nc)
        assert await subjects(nc, sj.TIMERS_STREAM) == {sj.timer_schedule("i"): 1}
        assert await stream_info(nc, BACKUP_STREAM) is None
    finally:
        await nc.close()


async def test_a_fired_timer_is_deleted_once_acknowledged(nats_factory: Callable[[], Any]) -> None:
    nc = await nats.connect(nats_factory().url)
    try:
        await ensure_streams(nc)
        js = nc.jetstream()
        sub = await js.pull_subscribe(sj.TIMER_FIRED, durable="router-timers", stream=sj.TIMERS_STREAM,
                                      config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT))
        await schedule(nc, "i", datetime.fromtimestamp(int(time.time()) - 1, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        (fired,) = await sub.fetch(1, timeout=10)
        assert fired.subject == sj.timer_fired("i")
        assert await subjects(nc, sj.TIMERS_STREAM) == {sj.timer_fired("i"): 1}
        await fired.ack_sync()
        for _ in range(50):
            if not await subjects(nc, sj.TIMERS_STREAM):
                break
            await asyncio.sleep(0.1)
        assert await subjects(nc, sj.TIMERS_STREAM) == {}
        assert orjson.loads(fired.data) == {}
    finally:
        await nc.close()
