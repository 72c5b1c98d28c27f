"""Operations surface of the HTTP process: a trace id per request, Prometheus ``/metrics``, and the
consumers' lag that ``/healthz`` turns red on.

Lag is read by this process from JetStream (consumer info of the router's durables) and from the
projection checkpoint it already follows, not pushed by the workers: the router and projections run
in child processes (or on other machines), and what matters is what the server says they have not
handled yet — which stays true when a worker is hung, restarting or gone, when self-reported
metrics would fall silent."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import structlog
from fastapi import APIRouter, Request, Response
from nats.aio.client import Client as NATS
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import tracing
from shared.auth import TokenError
from shared.events import subjects as sj
from shared.settings import Settings
from shared.store import lag as lagmod
from shared.store.lag import Lag

log = structlog.get_logger("needle.http")
UNMATCHED = "<unmatched>"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class LagMonitor:
    """Samples the lag of the router, its timers and the projections every ``interval`` seconds."""

    def __init__(self, nc: NATS, progress: Any, settings: Settings) -> None:
        self.nc, self.progress, self.settings = nc, progress, settings
        self.lags: dict[str, Lag] = {}
        self.sampled_at = 0.0

    async def sample(self) -> dict[str, Lag]:
        lags = {
            "router": await lagmod.consumer_lag(self.nc, sj.EVENTS_STREAM, "router"),
            # a fired timer waits out its edge while delivered: only the undelivered ones are late
            "router-timers": await lagmod.consumer_lag(self.nc, sj.TIMERS_STREAM, "router-timers",
                                                       in_flight_counts=False),
        }
        if self.progress is not None:
            lags["projections"] = await lagmod.checkpoint_lag(self.nc, int(self.progress.seq))
        self.lags, self.sampled_at = lags, time.time()
        return lags

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: /healthz says so through its own component
                log.debug("lag not sampled", error=repr(exc))
            await asyncio.sleep(self.settings.lag_sample_s)

    def behind(self) -> list[str]:
        """Consumers further behind than NEEDLE_HEALTH_MAX_LAG messages or NEEDLE_HEALTH_MAX_LAG_S seconds."""
        s = self.settings
        return sorted(name for name, lg in self.lags.items()
                      if lg.present and (lg.messages > s.health_max_lag or lg.seconds > s.health_max_lag_s))


class Metrics(Collector):
    """One registry per app (tests run several in one process): HTTP request counts and latencies by
    route template, and gauges read at scrape time from JetStream and the read models."""

    def __init__(self, monitor: LagMonitor | None, pool: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        # several intake workers (NEEDLE_WORKERS): each writes its counts to the shared directory and a
        # scrape, whichever worker answers it, sums them all (prometheus_client's multiprocess mode)
        shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        own = None if shared_dir else self.registry
        if shared_dir:
            MultiProcessCollector(self.registry, shared_dir)
        self.requests = Counter("needle_http_requests", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=own)
        self.latency = Histogram("needle_http_request_duration_seconds", "HTTP request latency by route template",
                                 ["method", "route"], registry=own,
                                 buckets=(.002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.monitor, self.pool = monitor, pool
        self.scraped: dict[str, float] = {}
        self.unserved: dict[tuple[str, str], float] = {}  # (kind, role) -> routings that found no such department
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.registry.register(self)

    def observe(self, method: str, template: str, status: int, elapsed: float) -> None:
        """Count one request and its latency (label children are looked up once per label set)."""
        key = (method, template, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(method, template, str(status)),
                                               self.latency.labels(method, template))
        children[0].inc()
        children[1].observe(elapsed)

    async def refresh(self, nc: NATS | None) -> None:
        """What is read at scrape time (cheap, but not worth a background loop)."""
        got: dict[str, float] = {}
        with contextlib.suppress(Exception):
            if nc is not None:
                got["timers_pending"] = float(await lagmod.timers_pending(nc))
                events = await lagmod.stream_state(nc, sj.EVENTS_STREAM)
                if events is not None:
                    got["events"] = float(events.get("messages", 0))
                    got["events_last_seq"] = float(events.get("last_seq", 0))
        with contextlib.suppress(Exception):
            if self.pool is not None:
                got["breaches"] = float(await self.pool.fetchval(
                    "SELECT coalesce(sum(n), 0) FROM stats_daily WHERE scope = 'dept' AND metric = 'sla_breached'"))
                rows = await self.pool.fetch("SELECT key, metric, sum(n)::bigint AS n FROM stats_daily "
                                             "WHERE scope = 'kind' GROUP BY key, metric")
                self.unserved = {(r["key"], r["metric"].removeprefix("unserved_")): float(r["n"]) for r in rows}
        with contextlib.suppress(Exception):
            if self.monitor is not None:
                await self.monitor.sample()
        self.scraped = got

    def collect(self) -> Iterator[Any]:
        if self.monitor is not None:
            msgs = GaugeMetricFamily("needle_consumer_lag_messages", "messages a consumer has not handled yet",
                                     labels=["consumer"])
            secs = GaugeMetricFamily("needle_consumer_lag_seconds", "age of the oldest message a consumer has "
                                     "not handled yet", labels=["consumer"])
            for name, lg in sorted(self.monitor.lags.items()):
                if lg.present:
                    msgs.add_metric([name], lg.messages)
                    secs.add_metric([name], lg.seconds)
            yield msgs
            yield secs
        g = self.scraped
        if "timers_pending" in g:
            yield GaugeMetricFamily("needle_timers_pending", "SLA timers scheduled and not yet fired",
                                    value=g["timers_pending"])
        if "events" in g:
            yield CounterMetricFamily("needle_events_appended", "events recorded in NEEDLE_EVENTS (stream messages)",
                                      value=g["events"])
            yield GaugeMetricFamily("needle_events_last_seq", "last sequence of NEEDLE_EVENTS",
                                    value=g["events_last_seq"])
        if "breaches" in g:
            yield CounterMetricFamily("needle_sla_breaches", "SLA clocks breached (per task, from the read models)",
                                      value=g["breaches"])
            unserved = CounterMetricFamily("needle_routing_unserved", "routings that found no department of a "
                                           "kind the rulebook names (role lead: the fallback took it; co: no "
                                           "co-task), from the read models", labels=["kind", "role"])
            for (kind, role), n in sorted(self.unserved.items()):
                unserved.add_metric([kind, role], n)
            yield unserved


class TraceAndMeasure:
    """Pure ASGI: a trace id per request (W3C ``traceparent``, else ``X-Request-Id``, else a new one),
    bound for the request's log lines and events and echoed in ``X-Request-Id`` (+ ``traceparent``);
    request count and latency by route template (never the raw path: bounded label sets)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trace_id, echo = trace_of(scope.get("headers", ()))
        status = 500

        async def send_traced(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg["headers"] = [*msg.get("headers", []), *echo]
            await send(msg)

        token = tracing.current.set(trace_id)
        t0 = time.perf_counter()
        try:
            with structlog.contextvars.bound_contextvars(trace_id=trace_id):
                await self.app(scope, receive, send_traced)
        finally:
            tracing.current.reset(token)
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            method = scope.get("method", "")
            if method not in METHODS:  # any token is a method to HTTP: keep the label set bounded
                method = "OTHER"
            elapsed = time.perf_counter() - t0
            self.metrics.observe(method, template, status, elapsed)
            log.debug("request", method=method, route=template, status=status, ms=round(elapsed * 1000, 2),
                      trace_id=trace_id, issue=scope.get("path_params", {}).get("issue_id"))


def trace_of(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, list[tuple[bytes, bytes]]]:
    """The request's trace id (W3C ``traceparent``, else ``X-Request-Id``, else a new one) and the
    response headers that echo it."""
    traceparent = request_id = None
    for name, value in headers:
        if name == b"traceparent":
            traceparent = value.decode("latin-1")
        elif name == b"x-request-id":
            request_id = value.decode("latin-1")
    trace_id = tracing.choose(traceparent, request_id)
    echo = [(b"x-request-id", trace_id.encode())]
    tp = tracing.traceparent_for(trace_id)
    if tp:
        echo.append((b"traceparent", tp.encode()))
    return trace_id, echo


def metrics_router(metrics: Metrics, settings: Settings, nc: NATS | None) -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/metrics", include_in_schema=True, response_class=Response,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
                           401: {"description": "NEEDLE_METRICS_TOKEN is set and the bearer token is not it"}})
    async def scrape(request: Request) -> Response:
        """Prometheus metrics. Open when NEEDLE_METRICS_TOKEN is unset (the default bind is 127.0.0.1);
        otherwise ``Authorization: Bearer <NEEDLE_METRICS_TOKEN>``."""
        if settings.metrics_token:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {settings.metrics_token}".encode()):
                raise TokenError("GET /metrics needs Authorization: Bearer <NEEDLE_METRICS_TOKEN>")
        await metrics.refresh(nc)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
