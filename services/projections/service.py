"""Starts the projection worker and registers its query routes."""
from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
import structlog

from .api import router as api_router
from .dashboard import router as dashboard_router
from .follower import CheckpointFollower
from .migrate import upgrade
from .schema import PROJECTION_VERSION
from .visits_read import router as visits_router
from .worker import ProjectionWorker, ProjectionWriter

if TYPE_CHECKING:
    from shared.runtime.stack import Stack

log = structlog.get_logger("needle.projections")


async def open_pool(url: str) -> asyncpg.Pool:
    # custom plans: asyncpg prepares every statement, and on tables without statistics yet (a fresh rebuild,
    # a new deployment) Postgres settles on a generic plan for `issue_id = ANY($1)` that scans the whole table
    pool = await asyncpg.create_pool(url.replace("postgresql+asyncpg://", "postgresql://"), min_size=1, max_size=10,
                                     server_settings={"plan_cache_mode": "force_custom_plan"})
    assert pool is not None
    return pool


async def start_projections(stack: Stack) -> ProjectionWorker:
    assert stack.nc is not None and stack.urls.database
    pool = await open_pool(stack.urls.database)
    stack.closers.append(pool.close)
    await upgrade(stack.urls.database)
    writer = ProjectionWriter(stack.org, stack.rulebook.tz)
    async with pool.acquire() as conn:
        _, version = await writer.checkpoint(conn)
    js = stack.nc.jetstream()
    if version is not None and version != PROJECTION_VERSION:
        from .rebuild import rebuild

        log.warning("projection code changed; rebuilding", stored=version, current=PROJECTION_VERSION)
        await rebuild(pool, js, writer, database_url=stack.urls.database)
    worker = ProjectionWorker(pool, js, writer, health=stack.health)
    stack.health["postgres"] = True
    _serve_reads(stack, pool, worker)
    stack.spawn("projections", worker.run(on_subscribed=stack.close_on_exit))
    return worker


def _serve_reads(stack: Stack, pool: asyncpg.Pool, progress: object) -> None:
    stack.extras["pool"] = pool
    stack.extras["projection"] = progress
    stack.extras.setdefault("routers", []).append(api_router)
    stack.extras["routers"].append(dashboard_router)
    stack.extras["routers"].append(visits_router)


async def start_read_api(stack: Stack) -> CheckpointFollower:
    """The query API and dashboard over read models that another process keeps (``needle up`` runs the
    projection worker as a child process)."""
    assert stack.urls.database
    pool = await open_pool(stack.urls.database)
    stack.closers.append(pool.close)
    follower = CheckpointFollower(pool, health=stack.health)
    _serve_reads(stack, pool, follower)
    stack.spawn("read-models", follower.run())
    return follower
