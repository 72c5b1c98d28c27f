"""GET /v1/events/stream on a real stack (demo Zhoushan org and rules): resumable without gap or duplicate,
the types and area filters, who may read it, and a slow client's overflow event."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.intake import events_api
from shared.events import subjects as sj
from shared.events.models import IssueReported
from tests.support import NeedleHandle

ROOT = Path(__file__).resolve().parents[2]
ORG = ROOT / "deploy" / "org" / "zhoushan.yaml"
RULES = ROOT / "deploy" / "rules" / "zhoushan.yaml"
DINGHAI_GRID, PUTUO_GRID = "wuxing-g1", "haibin-g1"  # grids of the two districts
STREAM = "/v1/events/stream"


@dataclass
class SseEvent:
    id: str | None
    event: str | None
    data: str


async def sse_events(r: httpx.Response) -> AsyncIterator[SseEvent]:
    """Parse a text/event-stream body (comments skipped, multi-line data joined)."""
    ev_id: str | None = None
    event: str | None = None
    data: list[str] = []
    async for line in r.aiter_lines():
        if line == "":
            if data:
                yield SseEvent(ev_id, event, "\n".join(data))
            ev_id, event, data = None, None, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                ev_id = value
            elif field == "event":
                event = value
            elif field == "data":
                data.append(value)


async def read(h: NeedleHandle, headers: dict[str, str], *, params: dict[str, str] | None = None,
               until: Callable[[list[SseEvent]], bool], limit: int | None = None,
               timeout: float = 15.0) -> list[SseEvent]:
    """Read the stream until ``until(events)`` holds or ``limit`` events were read, then disconnect."""
    got: list[SseEvent] = []

    async def go() -> None:
        async with h.client.stream("GET", STREAM, headers=headers, params=params, timeout=timeout) as r:
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            async for ev in sse_events(r):
                got.append(ev)
                if (limit is not None and len(got) >= limit) or until(got):
                    return

    await asyncio.wait_for(go(), timeout)
    return got


async def last_seq(h: NeedleHandle) -> int:
    assert h.stack.nc is not None
    info = await h.stack.nc.jetstream().stream_info(sj.EVENTS_STREAM)
    return int(info.state.last_seq)


async def consumers(h: NeedleHandle) -> int:
    assert h.stack.nc is not None
    return int((await h.stack.nc.jetstream().stream_info(sj.EVENTS_STREAM)).state.consumer_count)


async def report(h: NeedleHandle, grid: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        r = await h.client.post("/v1/issues", headers=h.auth("grid_worker", f"area:{grid}"),
                                json={"grid": grid, "category": "construction_nuisance", "title": f"noise {i}"})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


async def settled(h: NeedleHandle, ids: list[str]) -> int:
    """Wait until the router dispatched every issue and the stream stops growing; its last sequence."""
    for i in ids:
        await h.wait_for(f"/v1/issues/{i}", h.auth("admin"), lambda b: b["status"] == "dispatched")
    last = -1
    while (now := await last_seq(h)) != last:
        last = now
        await asyncio.sleep(0.3)
    return last


async def events_of(h: NeedleHandle, issue_id: str) -> list[dict[str, Any]]:
    r = await h.client.get(f"/v1/issues/{issue_id}/events", headers=h.auth("admin"))
    assert r.status_code == 200
    out: list[dict[str, Any]] = r.json()
    return out


def ids_of(events: list[SseEvent]) -> list[int]:
    return [int(e.id) for e in events if e.id is not None]


async def test_resume_with_last_event_id_has_no_gap_and_no_duplicate(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES)
    ids = await report(h, DINGHAI_GRID, 6) + await report(h, PUTUO_GRID, 6)
    last = await settled(h, ids)
    integrator = h.auth("integrator")
    base = await consumers(h)

    first = await read(h, integrator, until=lambda _: False, limit=last // 3)
    assert ids_of(first) == list(range(1, last // 3 + 1))  # from the first event, in stream order
    second = await read(h, integrator | {"Last-Event-ID": first[-1].id or ""}, until=lambda _: False,
                        limit=last // 3)
    third = await read(h, integrator, params={"last_event_id": second[-1].id or ""},
                       until=lambda ev: ev[-1].id == str(last))
    seen = ids_of(first) + ids_of(second) + ids_of(third)
    assert len(seen) == len(set(seen)), "duplicate ids across reconnects"
    assert set(seen) == set(range(1, last + 1)), "gap across reconnects"

    for ev in first + second + third:  # id = sequence, event = CloudEvents type, data = the CloudEvent
        ce = orjson.loads(ev.data)
        assert ce["specversion"] == "1.0" and ce["type"] == ev.event
    # every disconnected client's consumer is gone
    for _ in range(50):
        if await consumers(h) <= base:
            break
        await asyncio.sleep(0.1)
    assert await consumers(h) <= base

    # live events arrive on an open stream; ?live=true starts after the current end
    async def tail() -> list[SseEvent]:
        return await read(h, integrator, params={"live": "true"}, until=lambda ev: len(ev) >= 1)

    reader = asyncio.create_task(tail())
    await asyncio.sleep(0.5)
    new = await report(h, PUTUO_GRID, 1)
    got = await reader
    assert int(got[0].id or 0) == last + 1 and orjson.loads(got[0].data)["subject"] == new[0]


async def test_types_and_area_filters(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES)
    dinghai = await report(h, DINGHAI_GRID, 4)
    putuo = await report(h, PUTUO_GRID, 3)
    await settled(h, dinghai + putuo)
    history = {i: await events_of(h, i) for i in dinghai + putuo}
    all_events = sorted((e for evs in history.values() for e in evs), key=lambda e: e["sequence"])

    # types: only the named event types, all of them, in stream order
    wanted = {"needle.issue.reported.v1", "needle.task.dispatched.v1"}
    expect = [e["sequence"] for e in all_events if e["type"] in wanted]
    got = await read(h, h.auth("integrator"), params={"types": "issue_reported, task_dispatched"},
                     until=lambda ev: len(ev) >= len(expect))
    assert ids_of(got) == expect and {e.event for e in got} == wanted

    # area (integrator): only issues under Putuo
    expect = [e["sequence"] for e in all_events if e["subject"] in putuo]
    got = await read(h, h.auth("integrator"), params={"area": "putuo"}, until=lambda ev: len(ev) >= len(expect))
    assert ids_of(got) == expect

    # supervisor: limited to its own area by default; resuming after the reports needs the issue -> grid lookup
    sup = h.auth("supervisor", "area:dinghai")
    expect = [e["sequence"] for e in all_events if e["subject"] in dinghai]
    after = history[dinghai[0]][0]["sequence"]  # its issue_reported: the later events' grid must be looked up
    assert h.server is not None
    app: Any = h.server.config.app
    app.state.event_hub.grids = events_api.GridCache()  # forget the grids seen so far
    got = await read(h, sup | {"Last-Event-ID": str(after)}, until=lambda ev: ev[-1].id == str(expect[-1]))
    assert ids_of(got) == [s for s in expect if s > after]
    got = await read(h, sup, params={"types": "task_dispatched", "area": "huannan"},
                     until=lambda ev: len(ev) >= 1)
    assert all(orjson.loads(e.data)["subject"] in dinghai for e in got)
    r = await h.client.get(STREAM, headers=sup, params={"area": "putuo"})
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"


async def test_who_may_read_and_bad_parameters(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES, services=("intake",))
    assert (await h.client.get(STREAM)).status_code == 401
    r = await h.client.get(STREAM, headers=h.auth("grid_worker", f"area:{DINGHAI_GRID}"))
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    assert (await h.client.get(STREAM, headers=h.auth("handler", "dept:putuo-ocean"))).status_code == 403
    bad = [({"types": "issue_reportd"}, "types"), ({"area": "atlantis"}, "area"),
           ({"last_event_id": "abc"}, "Last-Event-ID"), ({"types": "rulebook_published", "area": "putuo"}, "types")]
    for params, field in bad:
        r = await h.client.get(STREAM, headers=h.auth("integrator"), params=params)
        assert r.status_code == 422 and r.json()["field"] == field, (params, r.text)
    # the rulebook in force is the stream's first event; an admin sees it
    got = await read(h, h.auth("admin"), until=lambda ev: len(ev) >= 1)
    assert got[0].id == "1" and got[0].event == "needle.rulebook.published.v1"


async def test_idle_stream_sends_pings(needle_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES, services=("intake",))
    monkeypatch.setattr(events_api, "PING_S", 0.2)
    lines: list[str] = []

    async def go() -> None:
        async with h.client.stream("GET", STREAM, headers=h.auth("integrator"), params={"live": "true"}) as r:
            async for line in r.aiter_lines():
                lines.append(line)
                if line.startswith(": ping"):
                    return

    await asyncio.wait_for(go(), 10)
    assert lines[-1].startswith(": ping") and not any(x.startswith("data:") for x in lines)


def test_grid_cache_keeps_the_most_recently_used() -> None:
    cache = events_api.GridCache(size=2)
    cache.put("a", "g1")
    cache.put("b", "g2")
    assert cache.get("a") == "g1"  # a is now the most recent
    cache.put("c", "g3")
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ("g1", None, "g3")


async def test_slow_client_gets_overflow_and_resumes_without_loss(needle_factory: Callable[..., Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES, services=("intake",))
    assert h.stack.store is not None
    now = datetime.now(UTC)
    big = "x" * 100_000  # large events fill the socket buffers quickly, so the server must queue
    for i in range(120):
        big_one = IssueReported(grid=PUTUO_GRID, category="construction_nuisance", title=f"big {i}",
                                description=big, reporter="test", reported_at=now)
        await h.stack.store.append(f"01BIG{i:021d}", [big_one], expected_last_seq=0, version=0, now=now)
    last = await last_seq(h)
    monkeypatch.setattr(events_api, "QUEUE_MAX", 3)
    base = await consumers(h)

    seen: list[int] = []
    overflow: SseEvent | None = None
    async with h.client.stream("GET", STREAM, headers=h.auth("integrator"), timeout=30) as r:
        assert r.status_code == 200
        await asyncio.sleep(2.0)  # read nothing while the server runs out of queue
        async for ev in sse_events(r):
            if ev.event == "needle.stream.overflow":
                overflow = ev
            else:
                seen.append(int(ev.id or 0))
    assert overflow is not None, f"no overflow event after {len(seen)} events"
    resume_at = orjson.loads(overflow.data)["last_event_id"]
    assert resume_at == overflow.id == str(seen[-1] if seen else 0)
    assert seen == list(range(1, len(seen) + 1)) and len(seen) < last
    for _ in range(50):  # the overflowed client's consumer was released
        if await consumers(h) <= base:
            break
        await asyncio.sleep(0.1)
    assert await consumers(h) <= base

    monkeypatch.setattr(events_api, "QUEUE_MAX", 10_000)
    rest = await read(h, h.auth("integrator") | {"Last-Event-ID": resume_at}, until=lambda ev: ev[-1].id == str(last))
    assert seen + ids_of(rest) == list(range(1, last + 1))


@pytest.mark.parametrize("path", ["/v1/schemas", "/v1/schemas/needle.issue.reported.v1"])
async def test_schemas_are_public(needle_factory: Callable[..., Any], path: str) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES, services=("intake",))
    r = await h.client.get(path)
    assert r.status_code == 200
    body = r.json()
    if path == "/v1/schemas":
        assert body["needle.task.dispatched.v1"].endswith("/v1/schemas/needle.task.dispatched.v1")
        assert (await h.client.get(body["needle.issue.closed.v1"])).status_code == 200
    else:
        assert r.headers["content-type"].startswith("application/schema+json")
        assert body["properties"]["type"] == {"const": "needle.issue.reported.v1"}
    assert (await h.client.get("/v1/schemas/needle.nope.v1")).status_code == 404
