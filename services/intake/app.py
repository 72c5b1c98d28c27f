"""The HTTP surface: one FastAPI app for grid workers, handlers, supervisors and integrators."""
from __future__ import annotations

from fastapi import FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware

from services.media import api as media_api
from services.open311.api import router as open311_router

from . import (
    campaigns_api,
    comments_api,
    events_api,
    followup_api,
    issues_api,
    problems,
    publication_api,
    residents_api,
    surfaces,
    tasks_api,
    triage_api,
    visits_api,
)
from .context import AppContext
from .fastpath import NeedleAPI
from .issues_api import json_response
from .observability import Metrics, TraceAndMeasure, metrics_router

CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "If-Match", "Needle-Min-Seq",
                        "Last-Event-ID", "Accept", "Accept-Language", "traceparent", "X-Request-Id"]
CORS_RESPONSE_HEADERS = ["ETag", "Location", "Needle-Seq", "Retry-After", "Idempotent-Replayed", "X-Request-Id",
                         "traceparent"]


def create_app(ctx: AppContext, extra_routers: tuple[object, ...] = ()) -> FastAPI:
    app = NeedleAPI(
        title="needle",
        version="0.1.0",
        description="千条线穿进一根针 — event-sourced issue escalation for grid-based community governance.",
        docs_url=None,  # /docs and /redoc come from surfaces.py, with their assets from the package (offline)
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.ctx = ctx
    problems.install(app)
    for router in (issues_api.router, tasks_api.router, campaigns_api.router, events_api.router,
                   residents_api.router, visits_api.router, media_api.router, triage_api.router, comments_api.router,
                   followup_api.router, publication_api.router):
        app.include_router(router, responses=problems.RESPONSES)
    app.include_router(surfaces.router)  # /app/ (the working pages), /docs, /redoc: static, no data
    app.include_router(open311_router)  # answers errors in the GeoReport form, declared in its own routes
    for r in extra_routers:  # read models, dashboard, webhooks: problem+json errors too
        app.include_router(r, responses=problems.RESPONSES)  # type: ignore[arg-type]
    monitor = ctx.lag
    metrics = Metrics(monitor, ctx.read_models.pool if ctx.read_models else None)
    app.state.metrics = metrics
    app.include_router(metrics_router(metrics, ctx.settings, ctx.nc), responses=problems.RESPONSES)

    @app.get("/healthz", tags=["ops"],
             responses={503: {"description": "degraded: the same body, naming what is down",
                              "content": {"application/json": {}}}})
    async def healthz() -> Response:
        """200 when NATS, Postgres and every worker are up and no consumer is further behind than
        NEEDLE_HEALTH_MAX_LAG messages / NEEDLE_HEALTH_MAX_LAG_S seconds; 503 naming what is down
        (``lag:<consumer>`` for one too far behind) otherwise. ``lag`` gives each consumer's backlog."""
        down = sorted(k for k, ok in ctx.health.items() if not ok)
        body: dict[str, object] = {"status": "ok", "components": ctx.health, "down": down,
                                   "rulebook_version": ctx.rulebook.version}
        if monitor is not None:
            down += [f"lag:{name}" for name in monitor.behind()]
            body["lag"] = {name: lg.as_dict() for name, lg in sorted(monitor.lags.items()) if lg.present}
            body["lag_limits"] = {"messages": ctx.settings.health_max_lag, "seconds": ctx.settings.health_max_lag_s}
        if down:
            body["status"] = "degraded"
        return json_response(body, 200 if not down else 503)

    # a plain report is answered ahead of the framework (see fastpath.py); everything else takes the whole stack
    app.take_reports_first(ctx, metrics)
    # browsers of the listed origins only (NEEDLE_CORS_ORIGINS, none by default); bearer tokens, no cookies
    app.add_middleware(CORSMiddleware, allow_origins=ctx.settings.cors_origins, allow_credentials=False,
                       allow_methods=["GET", "POST", "DELETE"], allow_headers=CORS_REQUEST_HEADERS,
                       expose_headers=CORS_RESPONSE_HEADERS, max_age=600)
    # photos have their own limit (NEEDLE_MEDIA_MAX_BYTES), counted by the upload route as it streams them
    app.add_middleware(problems.BodyLimit, limit=ctx.settings.max_body_bytes, exempt=(media_api.UPLOAD_PATH,))
    app.add_middleware(problems.SecurityHeaders)
    app.add_middleware(TraceAndMeasure, metrics=metrics)  # outermost: sees every request and its route
    return app
