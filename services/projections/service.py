"""Starts the projection worker and registers its query routes."""
from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
import structlog

from .api import router as api_router
from .dashboard import router as dashboard_router
from .migrate import upgrade
from .schema import PROJECTION_VERSION
from .worker import ProjectionWorker, ProjectionWriter

if TYPE_CHECKING:
    from shared.runtime.stack import Stack

log = structlog.get_logger("needle.projections")


async def open_pool(url: str) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(url.replace("postgresql+asyncpg://", "postgresql://"), min_size=1, max_size=10)
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
        await rebuild(pool, js, writer)
    worker = ProjectionWorker(pool, js, writer, health=stack.health)
    stack.health["postgres"] = True
    stack.extras["pool"] = pool
    stack.extras["projection"] = worker
    stack.extras.setdefault("routers", []).append(api_router)
    stack.extras["routers"].append(dashboard_router)
    stack.spawn("projections", worker.run(on_subscribed=stack.close_on_exit))
    return worker
