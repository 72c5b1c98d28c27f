"""Observability of a real needle (NATS + Postgres): trace ids from the request into the events,
Prometheus /metrics that move with the traffic, and /healthz that turns red when the projections fall
behind and green when they catch up."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support import NeedleHandle, events, report

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def scrape(h: NeedleHandle, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple[Any, ...]], float]:
    r = await h.client.get("/metrics", headers=headers or {})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[Any, ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_trace_id_of_the_request_is_echoed_and_carried_by_every_event_of_the_flow(needle: NeedleHandle) -> None:
    h = needle
    r = await h.client.post("/v1/issues", headers={**h.auth("grid_worker", "area:wuxing-g1"),
                                                   "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"},
                            json={"grid": "wuxing-g1", "category": "road_damage", "title": "pothole"})
    assert r.status_code == 201, r.text
    assert r.headers["x-request-id"] == TRACE
    assert r.headers["traceparent"].startswith(f"00-{TRACE}-")
    issue_id = r.json()["id"]
    for _ in range(200):  # the router's reactions (routed, dispatched) continue the same trace
        evs = await events(h, issue_id)
        if any(e["type"] == "needle.task.dispatched.v1" for e in evs):
            break
        await asyncio.sleep(0.05)
    assert {e["source"] for e in evs} >= {"needle/intake", "needle/router"}
    assert [e.get("correlationid") for e in evs] == [TRACE] * len(evs)

    r = await h.client.get("/healthz", headers={"X-Request-Id": "probe-17"})
    assert r.headers["x-request-id"] == "probe-17" and "traceparent" not in r.headers
    r = await h.client.get("/healthz")
    assert len(r.headers["x-request-id"]) == 32  # made up when none is given


async def test_metrics_move_with_reports_and_want_the_token_when_one_is_set(needle: NeedleHandle) -> None:
    h = needle
    before = await scrape(h)
    ids = [await report(h, "road_damage") for _ in range(3)]
    bad = await h.client.post("/v1/issues", headers=h.auth("grid_worker", "area:wuxing-g1"), json={"grid": 1})
    assert bad.status_code == 422
    await h.client.get(f"/v1/issues/{ids[0]}", headers=h.auth("admin"))
    await h.wait_for("/v1/issues?limit=50", h.auth("supervisor", "area:city"),
                     lambda b: sum(1 for i in b["items"] if i["status"] == "dispatched") >= 3)
    after = await scrape(h)

    post = {"method": "POST", "route": "/v1/issues"}
    assert value(after, "needle_http_requests_total", **post, status="201") - \
        value(before, "needle_http_requests_total", **post, status="201") == 3
    assert value(after, "needle_http_requests_total", **post, status="422") == 1
    # by route template, never the raw path
    assert value(after, "needle_http_requests_total", method="GET", route="/v1/issues/{issue_id}", status="200") >= 1
    assert not any(ids[0] in str(labels) for _, labels in after)
    assert value(after, "needle_http_request_duration_seconds_count", **post) >= 4
    # each report is reported + routed + 2 tasks dispatched (road_damage: a lead and a co-handler)
    assert value(after, "needle_events_appended_total") - value(before, "needle_events_appended_total") >= 12
    assert value(after, "needle_timers_pending") >= 3  # a timer per dispatch (lead + co-task), hours away
    for consumer in ("router", "router-timers", "projections"):
        assert ("needle_consumer_lag_messages", (("consumer", consumer),)) in after
    assert value(after, "needle_sla_breaches_total") == 0

    # with NEEDLE_METRICS_TOKEN set, /metrics wants it (problem+json 401 otherwise)
    h.stack.settings.metrics_token = "s3cret"
    try:
        r = await h.client.get("/metrics")
        assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
        assert (await h.client.get("/metrics", headers={"Authorization": "Bearer nope"})).status_code == 401
        samples = await scrape(h, {"Authorization": "Bearer s3cret"})
        assert ("needle_consumer_lag_messages", (("consumer", "router"),)) in samples
    finally:
        h.stack.settings.metrics_token = None


async def _health(h: NeedleHandle) -> tuple[int, dict[str, Any]]:
    r = await h.client.get("/healthz")
    body: dict[str, Any] = r.json()
    return r.status_code, body


async def _until(h: NeedleHandle, want: Callable[[int, dict[str, Any]], bool], timeout: float = 20.0
                 ) -> tuple[int, dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status, body = await _health(h)
        if want(status, body) or asyncio.get_running_loop().time() > deadline:
            return status, body
        await asyncio.sleep(0.1)


async def test_health_turns_red_while_projections_lag_and_green_when_they_catch_up(
        needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(health_max_lag=5, lag_sample_s=0.1)
    status, body = await _until(  # once caught up with the start (the rulebook event)
        h, lambda s, b: s == 200 and b.get("lag", {}).get("projections", {}).get("messages") == 0)
    assert status == 200 and body["status"] == "ok", body
    assert body["lag"]["projections"]["messages"] == 0 and body["lag_limits"]["messages"] == 5

    # stop the projection worker (the task, as a hung or stopped worker process would)
    worker = h.stack.projection_worker
    task = next(t for t in h.stack.life.tasks if t.get_name() == "projections")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    h.stack.life.tasks.remove(task)
    for _ in range(3):  # 3 reports: >= 9 events behind with the router's reactions
        await report(h, "road_damage")
    status, body = await _until(h, lambda s, b: s == 503)
    assert status == 503, body
    assert body["status"] == "degraded" and "lag:projections" in body["down"], body
    assert body["lag"]["projections"]["messages"] > 5
    assert body["components"]["nats"] is True  # every component is up: only the lag is wrong

    h.stack.life.spawn("projections", worker.run())  # resumes at its checkpoint
    status, body = await _until(h, lambda s, b: s == 200)
    assert status == 200 and body["status"] == "ok", body
    assert body["lag"]["projections"]["messages"] == 0
