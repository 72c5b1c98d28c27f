"""Webhooks on a real stack: a local receiver that fails, times out and recovers; dead letters and replay;
a restart that loses nothing; the API's validation and ownership; the area filter; and a throughput
figure (``-m slow``)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import httpx
import nats
import orjson
import pytest

from services.integrations import signing
from services.integrations.delivery import DeliveryConfig
from services.integrations.targets import AllowList
from services.integrations.webhooks import WebhookService
from shared.domain.ids import new_issue_id
from shared.events import subjects as sj
from shared.events.codec import encode
from shared.events.models import BY_NAME, IssueReported, IssueUrged
from shared.store.eventstore import JetStreamEventStore, make_envelopes
from tests.support import NeedleHandle

SECRET = "s3cret-for-tests-0123456789"
GRID, OTHER_GRID = "wuxing-g1", "wuxing-g2"
TYPES = ["issue_reported", "issue_routed", "task_dispatched"]
# the receivers here listen on 127.0.0.1: the operator's allow-list lets webhooks reach them (targets.py)
LOCAL: dict[str, Any] = {"webhook_allow_private": ["127.0.0.1"]}
LOOPBACK = AllowList.parse(["127.0.0.1"])
FAST = DeliveryConfig(base_s=0.01, cap_s=0.05, max_attempts=1000, timeout_s=0.3, ack_wait_s=3,
                      allow_private=("127.0.0.1",))


@dataclass
class Hit:
    event_id: str
    status: int  # what the receiver answered; 0 = it took too long (the sender gave up)
    body: bytes
    headers: dict[str, str]


@dataclass
class Receiver:
    """A tiny keep-alive HTTP/1.1 server on a free port; ``answer`` decides each response."""

    answer: Callable[[int], Awaitable[int]]
    hits: list[Hit] = field(default_factory=list)
    server: asyncio.Server | None = None
    url: str = ""

    async def start(self) -> Receiver:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0, backlog=1024)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"
        return self

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")[1:]
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                n = len(self.hits)
                hit = Hit(headers.get("needle-event-id", ""), 0, body, headers)
                self.hits.append(hit)
                hit.status = await self.answer(n)
                writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n\r\n" % hit.status)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def accepted(self) -> list[Hit]:
        return [h for h in self.hits if 200 <= h.status < 300]

    def accepted_ids(self) -> set[str]:
        return {h.event_id for h in self.accepted()}

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


def answers(*plan: tuple[int, int | str]) -> Callable[[int], Awaitable[int]]:
    """``(count, status | "timeout")`` steps, then 204 forever."""
    async def answer(n: int) -> int:
        for count, what in plan:
            if n < count:
                if what == "timeout":
                    await asyncio.sleep(FAST.timeout_s * 3)
                    return 0
                return int(what)
            n -= count
        return 204
    return answer


def service(h: NeedleHandle) -> WebhookService:
    return cast(WebhookService, h.stack.webhooks)


async def register(h: NeedleHandle, url: str, types: list[str] = TYPES, area: str | None = None,
                   who: dict[str, str] | None = None) -> str:
    body: dict[str, Any] = {"url": url, "types": types, "secret": SECRET}
    if area:
        body["area"] = area
    r = await h.client.post("/v1/webhooks", headers=who or h.auth("integrator"), json=body)
    assert r.status_code == 201, r.text
    assert "secret" not in r.json() and r.headers["location"] == f"/v1/webhooks/{r.json()['id']}"
    return str(r.json()["id"])


async def report(h: NeedleHandle, n: int, grid: str = GRID) -> list[str]:
    ids = []
    for i in range(n):
        r = await h.client.post("/v1/issues", headers=h.auth("grid_worker", f"area:{grid}"),
                                json={"grid": grid, "category": "road_damage", "title": f"pothole {i}"})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


async def expected(h: NeedleHandle, issues: list[str], types: list[str] = TYPES) -> dict[str, list[str]]:
    """issue -> ids of its events of ``types``, once the router dispatched it."""
    out = {}
    ce_types = {BY_NAME[t].ce_type for t in types}
    for i in issues:
        await h.wait_for(f"/v1/issues/{i}", h.auth("admin"), lambda b: b["status"] == "dispatched")
        r = await h.client.get(f"/v1/issues/{i}/events", headers=h.auth("admin"))
        out[i] = [e["id"] for e in r.json() if e["type"] in ce_types]
    return out


async def stream_last_seq(h: NeedleHandle) -> int:
    assert h.stack.nc is not None
    return int((await h.stack.nc.jetstream().stream_info(sj.EVENTS_STREAM)).state.last_seq)


async def until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def check_signatures_and_order(rx: Receiver) -> None:
    firsts: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for hit in rx.accepted():
        signing.verify(SECRET, hit.body, hit.headers["needle-signature"])  # raises if wrong
        ce = orjson.loads(hit.body)
        assert ce["id"] == hit.event_id and ce["type"] == hit.headers["needle-event-type"]
        assert hit.headers["content-type"] == "application/cloudevents+json" and ce["specversion"] == "1.0"
        if hit.event_id not in seen:  # at least once: dedupe by Needle-Event-Id
            seen.add(hit.event_id)
            issue, _, n = hit.event_id.rpartition(".")
            firsts[issue].append(int(n))
    for issue, ns in firsts.items():
        assert ns == sorted(ns) and len(set(ns)) == len(ns), f"issue {issue} out of order: {ns}"


async def test_flaky_receiver_gets_every_event_signed_and_in_order(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(**LOCAL)
    service(h).config = FAST
    rx = await Receiver(answers((25, 500), (12, "timeout"), (10, 503))).start()
    hook = await register(h, rx.url)
    want = await expected(h, await report(h, 8))
    all_ids = {e for ids in want.values() for e in ids}
    await until(lambda: rx.accepted_ids() >= all_ids, what="every event accepted")
    check_signatures_and_order(rx)
    assert rx.accepted_ids() == all_ids
    assert {h_.headers["needle-webhook-id"] for h_ in rx.hits} == {hook}
    assert sum(1 for x in rx.hits if x.status != 204) == 47  # every failure was retried in place
    stats = (await h.client.get(f"/v1/webhooks/{hook}", headers=h.auth("integrator"))).json()["delivery"]
    assert stats["parked"] == 0 and stats["failed_attempts"] >= 47
    assert (await h.client.get(f"/v1/webhooks/{hook}/dead-letters", headers=h.auth("integrator"))).json() == []
    await rx.close()


async def test_dead_letters_after_max_attempts_then_replay(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(**LOCAL)
    service(h).config = DeliveryConfig(base_s=0.01, cap_s=0.02, max_attempts=3, timeout_s=0.3, ack_wait_s=3,
                                        allow_private=("127.0.0.1",))
    failing = True

    async def answer(_: int) -> int:
        return 500 if failing else 200

    rx = await Receiver(answer).start()
    hook = await register(h, rx.url)
    want = await expected(h, await report(h, 3))
    all_ids = {e for ids in want.values() for e in ids}
    auth = h.auth("integrator")

    async def letters() -> list[dict[str, Any]]:
        return list((await h.client.get(f"/v1/webhooks/{hook}/dead-letters", headers=auth)).json())

    deadline = time.monotonic() + 20
    while len(parked := await letters()) < len(all_ids):
        assert time.monotonic() < deadline, parked
        await asyncio.sleep(0.1)
    assert {d["event_id"] for d in parked} == all_ids
    assert all(d["attempts"] == 3 and d["status"] == 500 and d["error"] == "HTTP 500" for d in parked)
    assert [d["seq"] for d in parked] == sorted(d["seq"] for d in parked)
    assert len(rx.hits) == 3 * len(all_ids)

    r = await h.client.post(f"/v1/webhooks/{hook}/dead-letters/replay", headers=auth)
    assert r.json() == {"replayed": 0, "still_failing": len(all_ids)}
    assert len(rx.hits) == 3 * len(all_ids) + len(want)  # each issue stops at its first failure
    assert all(d["attempts"] == 4 for d in await letters() if d["event_id"].endswith(".1"))

    failing = False
    r = await h.client.post(f"/v1/webhooks/{hook}/dead-letters/replay", headers=auth)
    assert r.json() == {"replayed": len(all_ids), "still_failing": 0}
    assert await letters() == []
    assert rx.accepted_ids() == all_ids
    check_signatures_and_order(rx)
    more = await expected(h, await report(h, 1))  # later events flow as before
    await until(lambda: rx.accepted_ids() >= set(next(iter(more.values()))), what="new events")
    await rx.close()


async def test_restart_loses_nothing(needle_factory: Callable[..., Any]) -> None:
    h1: NeedleHandle = await needle_factory(**LOCAL)
    service(h1).config = FAST
    slow = False

    async def answer(_: int) -> int:
        if slow:
            await asyncio.sleep(0.2)
        return 204

    rx = await Receiver(answer).start()
    hook = await register(h1, rx.url)
    want = await expected(h1, await report(h1, 3))
    await until(lambda: rx.accepted_ids() >= {e for ids in want.values() for e in ids}, what="first events")
    # stop while a slow receiver still has events in hand: they go back to the consumer
    slow = True
    more = await expected(h1, await report(h1, 6))
    await h1.close()
    nats_url, db = h1.stack.urls.nats, (h1.stack.urls.database or "").rsplit("/", 1)[1]

    # events written while no webhook process runs
    nc = await nats.connect(nats_url)
    store, now = JetStreamEventStore(nc), datetime.now(UTC)
    await store.start()
    offline = [new_issue_id(int(time.time() * 1000), random.getrandbits(80)) for _ in range(4)]
    for issue in offline:
        await store.append(issue, [IssueReported(grid=GRID, category="road_damage", title="offline", reporter="t",
                                                 reported_at=now)], expected_last_seq=0, version=0, now=now)
    await nc.drain()

    slow = False
    h2: NeedleHandle = await needle_factory(nats_url=nats_url, database=db, **LOCAL)
    service(h2).config = FAST
    later = await expected(h2, offline)  # the router reacts to them after the restart
    all_ids = {e for d in (want, more, later) for ids in d.values() for e in ids}
    await until(lambda: rx.accepted_ids() >= all_ids, timeout=30, what="every event after the restart")
    assert rx.accepted_ids() == all_ids
    check_signatures_and_order(rx)
    r = await h2.client.get("/v1/webhooks", headers=h2.auth("integrator"))
    assert [w["id"] for w in r.json()] == [hook]
    await rx.close()


async def test_area_filter_looks_up_the_grid(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(**LOCAL)
    service(h).config = FAST
    rx = await Receiver(answers()).start()
    await register(h, rx.url, types=["task_dispatched"], area=GRID)  # issue_reported is not subscribed
    mine = await expected(h, await report(h, 3, GRID), ["task_dispatched"])
    others = await expected(h, await report(h, 3, OTHER_GRID), ["task_dispatched"])
    want = {e for ids in mine.values() for e in ids}
    await until(lambda: rx.accepted_ids() >= want, what="area events")
    await asyncio.sleep(0.5)
    assert rx.accepted_ids() == want and not want & {e for ids in others.values() for e in ids}
    await rx.close()


async def test_api_validation_and_ownership(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(services=("intake",), **LOCAL)
    alice, bob = h.auth("integrator", subject="alice"), h.auth("integrator", subject="bob")
    url = "https://example.invalid/hook"
    ok: dict[str, Any] = {"url": url, "types": ["task_dispatched"], "secret": SECRET}
    assert (await h.client.post("/v1/webhooks", json=ok)).status_code == 401
    r = await h.client.post("/v1/webhooks", json=ok, headers=h.auth("grid_worker", f"area:{GRID}"))
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    bad: list[tuple[dict[str, Any], str]] = [({"url": "ftp://example.invalid/x"}, "url"), ({"url": "not a url"}, "url"),
           ({"url": "https://e.invalid/" + "x" * 2000}, "url"), ({"types": ["task_dispatchd"]}, "types"),
           ({"types": []}, "types"), ({"area": "atlantis"}, "area"), ({"secret": "short"}, "secret"),
           ({"secret": "x" * 201}, "secret"), ({"types": ["rulebook_published"], "area": GRID}, "types")]
    for change, fld in bad:
        r = await h.client.post("/v1/webhooks", json=ok | change, headers=alice)
        assert r.status_code == 422 and r.json()["field"] == fld, (change, r.text)
    a = await register(h, url, ["task_dispatched", "issue_closed"], area="wuxing", who=alice)
    b = await register(h, url, ["rulebook_published"], who=bob)
    r = await h.client.get(f"/v1/webhooks/{a}", headers=alice)
    assert r.status_code == 200 and "secret" not in r.text and SECRET not in r.text
    assert {k: r.json()[k] for k in ("id", "url", "types", "area")} == {
        "id": a, "url": url, "types": ["task_dispatched", "issue_closed"], "area": "wuxing"}
    assert [w["id"] for w in (await h.client.get("/v1/webhooks", headers=alice)).json()] == [a]
    assert {w["id"] for w in (await h.client.get("/v1/webhooks", headers=h.auth("admin"))).json()} == {a, b}
    for path in (f"/v1/webhooks/{a}", f"/v1/webhooks/{a}/dead-letters"):
        assert (await h.client.get(path, headers=bob)).status_code == 404
    assert (await h.client.delete(f"/v1/webhooks/{a}", headers=bob)).status_code == 404
    assert h.stack.nc is not None
    js = h.stack.nc.jetstream()  # each webhook has its durable consumer, gone with the webhook
    assert {c.name for c in await js.consumers_info(sj.EVENTS_STREAM)} >= {f"webhook-{a}", f"webhook-{b}"}
    assert (await h.client.delete(f"/v1/webhooks/{a}", headers=alice)).status_code == 204
    assert (await h.client.get(f"/v1/webhooks/{a}", headers=alice)).status_code == 404
    assert f"webhook-{a}" not in {c.name for c in await js.consumers_info(sj.EVENTS_STREAM)}
    assert a not in service(h).running and b in service(h).running


@pytest.mark.slow
async def test_measure_delivery_throughput(needle_factory: Callable[..., Any]) -> None:
    """Prints events/s delivered to a fast local 204 receiver (no timed assertion)."""
    n_issues, per_issue = int(os.environ.get("WEBHOOK_BENCH_ISSUES", "4000")), 5
    h: NeedleHandle = await needle_factory(services=("intake",), **LOCAL)
    svc = service(h)
    rx = await Receiver(answers()).start()
    hook = await register(h, rx.url, types=["issue_reported", "issue_urged"])
    await svc.close()  # write everything first, then time the delivery alone
    assert h.stack.nc is not None
    js, now = h.stack.nc.jetstream(), datetime.now(UTC)
    events = [IssueReported(grid=GRID, category="road_damage", title="b", reporter="b", reported_at=now),
              *[IssueUrged(by="bench") for _ in range(per_issue - 1)]]

    async def write(issue: str) -> None:  # one issue's events in order; issues side by side
        for env in make_envelopes(issue, events, version=0, now=now, actor="bench", causation=None, source="bench"):
            await js.publish(sj.issue_event(issue, env.data.name), encode(env), stream=sj.EVENTS_STREAM)

    for chunk in range(0, n_issues, 200):
        await asyncio.gather(*(write(f"bench{i:06d}") for i in range(chunk, min(n_issues, chunk + 200))))
    total = n_issues * per_issue
    t0 = time.perf_counter()
    await svc.start()
    await until(lambda: len(rx.hits) >= total, timeout=300, what="all deliveries")
    dt = time.perf_counter() - t0
    print(f"\nwebhook delivery: {total} events in {dt:.2f} s = {total / dt:,.0f} events/s "
          f"(hook {hook}, batch {svc.config.batch}, concurrency {svc.config.concurrency})")
    assert len(rx.accepted_ids()) == total
    await rx.close()


# -- the keep-alive transport, against scripted raw responses ---------------------------------------------
async def scripted(*responses: bytes) -> tuple[asyncio.Server, str, list[int]]:
    """A server answering the n-th request (over all connections) with ``responses[n]``; b"" = hang up
    before answering, b"sleep" = never answer. Returns the server, its URL and each request's connection."""
    conns: list[int] = []
    count = opened = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count, opened
        me = opened = opened + 1
        with contextlib.suppress(Exception):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                size = [ln for ln in head.lower().split(b"\r\n") if ln.startswith(b"content-length")]
                await reader.readexactly(int(size[0].split(b":")[1]))
                answer, count = responses[count], count + 1
                conns.append(me)
                if answer == b"sleep":
                    await asyncio.sleep(5)
                if not answer:
                    break
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer or b"HTTP/1.0" in answer:
                    break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x", conns


async def test_transport_framing_reuse_and_errors() -> None:
    from services.integrations.transport import KeepAliveTransport

    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    server, url, conns = await scripted(
        ok, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\n",
        b"HTTP/1.1 500 Oops\r\nContent-Length: 9000\r\n\r\n" + b"x" * 9000,  # too big: not read, not reused
        ok, b"",  # the server drops this reused connection before answering: sent once more on a new one
        b"HTTP/1.0 202 Accepted\r\n\r\nuntil close", b"sleep", ok)
    async with httpx.AsyncClient(transport=KeepAliveTransport(max_response_bytes=4096, allow=LOOPBACK)) as client:
        rs = [await client.post(url, content=b"{}") for _ in range(5)]
        assert [(r.status_code, r.content) for r in rs] == [
            (200, b"ok"), (201, b"abcde"), (500, b""), (200, b"ok"), (202, b"until close")]
        assert conns[0] == conns[1] == conns[2] != conns[3] == conns[4] != conns[5]  # reused / fresh
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await client.post(url, content=b"{}", timeout=0.3)
        assert time.monotonic() - t0 < 2 and (await client.post(url, content=b"{}")).status_code == 200
    server.close()
    async with httpx.AsyncClient(transport=KeepAliveTransport(allow=LOOPBACK)) as refused:
        with pytest.raises(httpx.ConnectError):
            await refused.post(url, content=b"{}")


async def test_with_intake_workers_the_first_delivers_what_another_registered_and_stops_what_it_removed(
        needle_factory: Callable[..., Any]) -> None:
    """NEEDLE_WORKERS > 1: every intake serves /v1/webhooks, only the first delivers. A webhook registered
    through another worker is delivered by the first (it follows the registry), and one removed through
    another worker stops there."""
    first: NeedleHandle = await needle_factory(workers=2, **LOCAL)
    db = (first.stack.urls.database or "").rsplit("/", 1)[1]
    other: NeedleHandle = await needle_factory(nats_url=first.stack.urls.nats, database=db, services=("intake",),
                                               workers=2, webhook_delivery=False, **LOCAL)
    service(first).config = FAST
    rx = await Receiver(answers()).start()
    hook = await register(other, rx.url)
    assert hook not in service(other).running  # registered there, not delivered there
    want = await expected(first, await report(other, 2))
    await until(lambda: rx.accepted_ids() >= {e for ids in want.values() for e in ids}, what="delivery by the first")
    assert hook in service(first).running and not service(other).running
    # where delivery stands is the same answer through either worker; the counters live in the first
    last = await stream_last_seq(first)

    async def progress(via: NeedleHandle) -> dict[str, Any]:
        body: dict[str, Any] = (await via.client.get(f"/v1/webhooks/{hook}", headers=via.auth("integrator"))).json()
        return body

    async def settled_progress() -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while True:
            got = await progress(other)
            done = got["progress"]["acknowledged_through_seq"] >= last and got["progress"]["in_flight"] == 0
            if done or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.1)

    via_other = await settled_progress()
    assert via_other["delivery"] is None
    assert via_other["progress"]["pending"] == 0 and via_other["progress"]["in_flight"] == 0, via_other
    assert via_other["progress"]["acknowledged_through_seq"] >= last, (via_other, last)
    via_first = await progress(first)
    assert via_first["progress"]["acknowledged_through_seq"] >= last
    assert via_first["delivery"]["delivered"] == sum(len(ids) for ids in want.values())
    r = await other.client.delete(f"/v1/webhooks/{hook}", headers=other.auth("integrator"))
    assert r.status_code == 204, r.text
    await until(lambda: hook not in service(first).running, timeout=10, what="the first to stop delivering")
    await rx.close()


async def test_progress_counts_what_waits_for_a_process_that_does_not_deliver(
        needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(webhook_delivery=False, services=("intake",), **LOCAL)
    rx = await Receiver(answers()).start()
    before = await stream_last_seq(h)
    hook = await register(h, rx.url, types=["issue_reported"])  # one type: the filter is exact
    await report(h, 3)
    got = (await h.client.get(f"/v1/webhooks/{hook}", headers=h.auth("integrator"))).json()
    assert got["delivery"] is None  # no delivery here, no counters
    # what was written before the webhook existed is none of its business: done, as far as it goes
    assert got["progress"] == {"pending": 3, "in_flight": 0, "acknowledged_through_seq": before}, got
    assert rx.hits == []
    await rx.close()
