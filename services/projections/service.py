"""Starts the projection worker and registers its query routes."""
from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import structlog
from fastapi import APIRouter
from nats.aio.client import Client as NATS

from shared.config import OrgTree, Rulebook
from shared.lifecycle import Lifecycle
from shared.privacy.issuekeys import IssueKeys

from .api import router as api_router
from .dashboard import router as dashboard_router
from .follower import CheckpointFollower
from .migrate import upgrade
from .progress import Progress
from .schema import PROJECTION_VERSION
from .scores import router as scores_router
from .visits_read import router as visits_router
from .worker import ProjectionWorker, ProjectionWriter

log = structlog.get_logger("needle.projections")


async def open_pool(url: str) -> asyncpg.Pool:
    # custom plans: asyncpg prepares every statement, and on tables without statistics yet (a fresh rebuild,
    # a new deployment) Postgres settles on a generic plan for `issue_id = ANY($1)` that scans the whole table
    pool = await asyncpg.create_pool(url.replace("postgresql+asyncpg://", "postgresql://"), min_size=1, max_size=10,
                                     server_settings={"plan_cache_mode": "force_custom_plan"})
    assert pool is not None
    return pool


@dataclass
class ReadModels:
    """The read models this process serves: the pool, how far they are (the worker that writes them here, or
    the follower of another process's checkpoint) and the query and dashboard routes."""
    pool: asyncpg.Pool
    progress: Progress
    routers: tuple[APIRouter, ...] = (api_router, dashboard_router, visits_router, scores_router)


async def start_projections(life: Lifecycle, nc: NATS, org: OrgTree, rulebook: Rulebook,
                            database_url: str, texts: IssueKeys | None = None) -> tuple[ReadModels, ProjectionWorker]:
    """Migrate, rebuild if the projection code changed, then fold the stream into Postgres until ``life``
    closes; the read models are served from this process too."""
    pool = await open_pool(database_url)
    life.on_close(pool.close)
    await upgrade(database_url)
    writer = ProjectionWriter(org, rulebook.tz, texts=texts)
    async with pool.acquire() as conn:
        _, version = await writer.checkpoint(conn)
    js = nc.jetstream()
    if version is not None and version != PROJECTION_VERSION:
        from .rebuild import rebuild

        log.warning("projection code changed; rebuilding", stored=version, current=PROJECTION_VERSION)
        await rebuild(pool, js, writer, database_url=database_url)
    worker = ProjectionWorker(pool, js, writer, health=life.health, texts=texts)
    life.health["postgres"] = True
    life.spawn("projections", worker.run(on_subscribed=life.close_on_exit))
    return ReadModels(pool, worker), worker


async def start_read_api(life: Lifecycle, database_url: str) -> ReadModels:
    """The query API and dashboard over read models that another process keeps (``needle up`` runs the
    projection worker as a child process)."""
    pool = await open_pool(database_url)
    life.on_close(pool.close)
    follower = CheckpointFollower(pool, health=life.health)
    life.spawn("read-models", follower.run())
    return ReadModels(pool, follower)
