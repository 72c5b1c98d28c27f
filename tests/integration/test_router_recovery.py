"""The router survives being killed and NATS being restarted: every issue is dispatched exactly once, and SLA
timers that were pending across the outage still fire (once).

The router runs as a real ``needle run router`` subprocess (SIGKILLed, restarted, two at once on the shared
durable consumer) against a real nats-server; reports go straight into the event store, or through intake.

The durable consumers are created up front with the router's own configuration except for a short
``ack_wait``: messages a killed router had fetched but not acknowledged come back after ``ack_wait`` (30 s for
events, 60 s for timers in production), and the tests should not sit that out. The router binds to an
existing durable without changing it (nats-py ``pull_subscribe``).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from services.entrypoints.embedded import EmbeddedNats
from shared.domain import ids
from shared.events import models as ev
from shared.events import subjects as sj
from tests.support import NeedleHandle, events, issue, now, of_type, report, share_kek, sleep_until, ts

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ORG = FIXTURES / "contract_org.yaml"
FAST = FIXTURES / "fast_rules.yaml"
NEEDLE = Path(sys.executable).parent / "needle"
GRIDS = ("wuxing-g1", "wuxing-g2")

BREACHED = "needle.sla.breached.v1"
WARNED = "needle.sla.warned.v1"
ESCALATED = "needle.issue.escalated.v1"
ROUTED = "needle.issue.routed.v1"

pytestmark = pytest.mark.timeout(90)


# -- helpers --------------------------------------------------------------------------------------------------
async def poll(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Await ``check()`` until it returns something truthy; returns it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def js_of(h: NeedleHandle) -> JetStreamContext:
    assert h.stack.nc is not None
    return h.stack.nc.jetstream()


async def subject_counts(js: JetStreamContext, stream: str, subjects: str) -> dict[str, int]:
    info = await js.stream_info(stream, subjects_filter=subjects)
    return dict(info.state.subjects or {})


async def per_issue(js: JetStreamContext, event_name: str) -> dict[str, int]:
    """issue id -> how many ``event_name`` events it has."""
    counts = await subject_counts(js, sj.EVENTS_STREAM, sj.events_of_type(event_name))
    return {sj.parse_issue_subject(s)[0]: n for s, n in counts.items()}


async def precreate_router_consumers(js: JetStreamContext, *, events_ack_wait: float = 2,
                                     timers_ack_wait: float = 5) -> None:
    """The router's durables (services/router/service.py) with a short ack_wait (see the module docstring)."""
    await js.add_consumer(sj.EVENTS_STREAM, ConsumerConfig(
        name="router", durable_name="router", filter_subject=f"{sj.EVENTS_ROOT}.issue.>",
        ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=events_ack_wait,
        max_ack_pending=20_000, max_deliver=-1))
    await js.add_consumer(sj.TIMERS_STREAM, ConsumerConfig(
        name="router-timers", durable_name="router-timers", filter_subject=sj.TIMER_FIRED,
        ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=timers_ack_wait,
        max_ack_pending=100_000, max_deliver=-1))


async def router_idle(js: JetStreamContext) -> bool:
    info = await js.consumer_info(sj.EVENTS_STREAM, "router")
    return info.num_pending == 0 and info.num_ack_pending == 0


class Routers:
    """``needle run router`` subprocesses; whatever is still running at the end gets SIGKILL."""

    rules: Path = FAST  # the rulebook the routers run on

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, nats_url: str) -> subprocess.Popen[bytes]:
        n = len(self.procs)
        data_dir = self.root / f"router{n}"
        data_dir.mkdir(parents=True, exist_ok=True)
        share_kek(data_dir, nats_url)  # the key-encryption key of the needle it serves: issues' text opens
        env = {**os.environ, "NEEDLE_NATS_URL": nats_url, "NEEDLE_ORG": str(ORG), "NEEDLE_RULES": str(self.rules),
               "NEEDLE_LOG_LEVEL": "warning"}
        env.pop("NEEDLE_DATABASE_URL", None)
        with open(self.root / f"router{n}.log", "ab") as log:
            proc = subprocess.Popen([str(NEEDLE), "run", "router", "--data-dir", str(data_dir)], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.glob("router*.log")))

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(Exception):
                self.kill(p)


@pytest.fixture
def routers(tmp_path: Path) -> Iterator[Routers]:
    r = Routers(tmp_path / "routers")
    r.root.mkdir()
    yield r
    r.close()


async def recovery_needle(needle_factory: Callable[..., Any], services: tuple[str, ...], **kw: Any) -> NeedleHandle:
    # No projections: nothing here reads the read models. Stack.close() drains the NATS connection, and a
    # pull subscription left subscribed by a cancelled worker (projections, router timers) makes that drain
    # wait out nats-py's whole 30 s drain_timeout (reported as a bug); bound the wait so teardown stays quick.
    h: NeedleHandle = await needle_factory(org=ORG, rules=FAST, services=services, **kw)
    assert h.stack.nc is not None
    h.stack.nc.options["drain_timeout"] = 2
    return h


async def pending_schedule(js: JetStreamContext, lead_id: str) -> bool:
    """The timer of the dispatch led by ``lead_id`` is pending."""
    return bool(await subject_counts(js, sj.TIMERS_STREAM, sj.timer_schedule(lead_id)))


async def scheduled_at(js: JetStreamContext, lead_id: str) -> datetime:
    """The edge the dispatch's timer is for: pending, or fired (set early) and held by the router until its edge."""
    try:
        msg = await js.get_last_msg(sj.TIMERS_STREAM, sj.timer_schedule(lead_id))
    except NotFoundError:
        msg = await js.get_last_msg(sj.TIMERS_STREAM, sj.timer_fired(lead_id))
    return ts(orjson.loads(msg.data)["at"])


def assert_escalated_once(evs: list[dict[str, Any]], task: dict[str, Any]) -> None:
    warned = of_type(evs, WARNED, task_id=task["id"], clock="acknowledge")
    breached = of_type(evs, BREACHED, task_id=task["id"], clock="acknowledge")
    escalated = of_type(evs, ESCALATED)
    assert len(warned) == 1 and len(breached) == 1 and len(escalated) == 1, (warned, breached, escalated)
    assert escalated[0]["data"]["cause"] == "acknowledge_breach"
    assert (escalated[0]["data"]["from_level"], escalated[0]["data"]["to_level"]) == ("community", "street")
    assert evs.index(warned[0]) < evs.index(breached[0]) < evs.index(escalated[0])
    warn_at = ts(task["dispatched_at"]) + (ts(task["acknowledge_due"]) - ts(task["dispatched_at"])) / 2
    assert ts(warned[0]["time"]) >= warn_at, "the warning fired early"
    lag = (ts(breached[0]["time"]) - ts(task["acknowledge_due"])).total_seconds()
    assert lag >= 0, f"breach fired {-lag:.3f} s early"
    assert [e["data"]["level"] for e in of_type(evs, ROUTED)] == ["community", "street"]


# -- routing: exactly once across kills and two routers --------------------------------------------------------
async def test_killed_and_concurrent_routers_dispatch_every_issue_exactly_once(
        needle_factory: Callable[..., Any], routers: Routers) -> None:
    total = 1000
    h = await recovery_needle(needle_factory, ())  # the store only: reports are appended directly
    assert h.stack.store is not None
    js = js_of(h)
    await precreate_router_consumers(js)
    store = h.stack.store
    issue_ids = [ids.new_issue_id(int(now().timestamp() * 1000), i) for i in range(total)]
    gate = asyncio.Semaphore(64)

    async def report_one(i: int, issue_id: str) -> None:
        t = now()
        e = ev.IssueReported(grid=GRIDS[i % 2], category="pothole", title=f"pothole {i}", reporter="grid_worker:test",
                             reported_at=t)
        async with gate:
            await store.append(issue_id, [e], expected_last_seq=0, version=0, now=t, actor="grid_worker:test",
                               msg_id=f"report:{issue_id}", source="test")

    async def routed() -> int:
        return len(await per_issue(js, "issue_routed"))

    first = routers.start(h.stack.urls.nats)
    feeding = asyncio.ensure_future(asyncio.gather(*(report_one(i, x) for i, x in enumerate(issue_ids))))
    try:
        # the first router dies (SIGKILL) in the middle of the stream
        await poll(lambda: _at_least(routed, 100), 30, "the first router to route 100 issues", every=0.01)
        routers.kill(first)
        at_kill = await routed()
        await feeding
        # two routers at once on the shared durable consumer; one of them is killed too
        second, third = routers.start(h.stack.urls.nats), routers.start(h.stack.urls.nats)
        await poll(lambda: _at_least(routed, at_kill + 200), 30, "two routers to route 200 more", every=0.01)
        routers.kill(second)
        at_second_kill = await routed()
        await poll(lambda: _at_least(routed, total), 40, f"all {total} issues to be routed")
        await poll(lambda: router_idle(js), 20, "the router consumer to drain")
        assert third.poll() is None, routers.logs()
    except AssertionError:
        print(routers.logs())
        raise
    finally:
        feeding.cancel()
    print(f"routed when the first router was killed: {at_kill}; when the second was: {at_second_kill}")
    assert 0 < at_kill < total, "the first router was not killed mid-stream"
    assert at_second_kill < total, "the second router was not killed mid-stream"

    routed_n = await per_issue(js, "issue_routed")
    dispatched_n = await per_issue(js, "task_dispatched")
    assert set(routed_n) == set(issue_ids)
    assert {n for n in routed_n.values()} == {1}, {k: n for k, n in routed_n.items() if n != 1}
    assert set(dispatched_n) == set(issue_ids)
    assert {n for n in dispatched_n.values()} == {2}, {k: n for k, n in dispatched_n.items() if n != 2}
    assert await per_issue(js, "task_superseded") == {}
    # and every issue got its SLA timer (one pending schedule per issue, for lead and co-task together)
    schedules = await subject_counts(js, sj.TIMERS_STREAM, sj.TIMER_SCHEDULES)
    assert set(schedules) == {sj.timer_schedule(ids.task_id(i, 1)) for i in issue_ids}  # keyed by the lead
    sample = await store.load(issue_ids[total // 2])
    assert [e.data.name for e in sample] == ["issue_reported", "issue_routed", "task_dispatched", "task_dispatched"]
    assert {e.data.department for e in sample if isinstance(e.data, ev.TaskDispatched)} == {
        "dinghai-roads", "dinghai-police"}


async def _at_least(count: Callable[[], Any], n: int) -> bool:
    return bool(await count() >= n)


# -- timers: pending across a router restart / a nats-server restart --------------------------------------------
async def test_timer_pending_across_router_restart_fires_once(needle_factory: Callable[..., Any],
                                                              routers: Routers) -> None:
    h = await recovery_needle(needle_factory, ("intake",))
    js = js_of(h)
    await precreate_router_consumers(js)
    router = routers.start(h.stack.urls.nats)
    iid = await report(h, "streetlight_outage")  # 8 s acknowledge clock, warning at 4 s
    body = await h.wait_for(f"/v1/issues/{iid}", h.auth("admin"), lambda b: len(b["tasks"]) == 1, timeout=20)
    (task,) = body["tasks"]
    await poll(lambda: pending_schedule(js, task["id"]), 5, "the dispatch's SLA timer")
    routers.kill(router)
    due = ts(task["acknowledge_due"])
    assert now() < due - timedelta(seconds=4), "the router was not killed before the clock's first edge"

    await sleep_until(due + timedelta(seconds=1))
    evs = await events(h, iid)
    assert of_type(evs, WARNED) == [] and of_type(evs, BREACHED) == [], "nobody should have been watching the clock"
    routers.start(h.stack.urls.nats)
    try:
        await h.wait_for(f"/v1/issues/{iid}", h.auth("admin"), lambda b: b["level"] == "street", timeout=20)
        await asyncio.sleep(1.5)  # a duplicate breach or escalation would show up by now
        await poll(lambda: router_idle(js), 10, "the router consumer to drain")
    except AssertionError:
        print(routers.logs())
        raise
    evs = await events(h, iid)
    assert_escalated_once(evs, task)
    street = [t for t in (await issue(h, iid))["tasks"] if t["level"] == "street"]
    assert [(t["department"], t["role"], t["status"]) for t in street] == [("huannan-center", "lead", "dispatched")]


@pytest.mark.slow  # restart/fault or bench smoke: `pytest -m slow`
async def test_timer_pending_across_nats_restart_fires_once(needle_factory: Callable[..., Any],
                                                            nats_factory: Callable[..., Any]) -> None:
    nats = nats_factory()
    h = await recovery_needle(needle_factory, ("intake", "router"), nats_url=nats.url)
    js = js_of(h)
    iid = await report(h, "streetlight_outage")
    body = await h.wait_for(f"/v1/issues/{iid}", h.auth("admin"), lambda b: len(b["tasks"]) == 1)
    (task,) = body["tasks"]
    await poll(lambda: pending_schedule(js, task["id"]), 5, "the dispatch's SLA timer")

    nats.stop()
    restarted = EmbeddedNats(nats.data_dir, port=nats.port)
    restarted.start()
    try:
        # back before the warning's schedule was due to fire (set 2 s early, on a 1 s grain): the timer was
        # pending in NEEDLE_TIMERS across the restart
        warn = ts(task["dispatched_at"]) + (ts(task["acknowledge_due"]) - ts(task["dispatched_at"])) / 2
        fires = datetime.fromtimestamp(int((warn - timedelta(seconds=2)).timestamp()), UTC)
        print(f"nats-server back {(fires - now()).total_seconds():.3f} s before the first timer was due to fire")
        assert now() < fires, "the restart took too long to leave a timer pending across it"
        # the client reconnects by itself; the warning and the breach still come, on time and once
        due = ts(task["acknowledge_due"])
        await h.wait_for(f"/v1/issues/{iid}", h.auth("admin"), lambda b: b["level"] == "street",
                         timeout=(due - now()).total_seconds() + 10)
        await asyncio.sleep(1.5)
        evs = await events(h, iid)
        assert_escalated_once(evs, task)
        lag = (ts(of_type(evs, BREACHED)[0]["time"]) - due).total_seconds()
        print(f"breach lag after a nats-server restart: {lag:.3f} s")
        # the street dispatch's timer runs for the street lead's clock (its warning, or a later edge if that fired)
        street = street_lead(await issue(h, iid))
        at = await scheduled_at(js, street["id"])
        start, ack_due = ts(street["dispatched_at"]), ts(street["acknowledge_due"])
        assert at in (start + (ack_due - start) / 2, ack_due), (at, street)  # warn_at 0.5
    finally:
        await h.close()
        restarted.stop()


def street_lead(body: dict[str, Any]) -> dict[str, Any]:
    (lead,) = [t for t in body["tasks"] if t["level"] == "street" and t["role"] == "lead"]
    return lead
