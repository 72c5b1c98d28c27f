"""The read models as seen from a process that does not run the projection worker (the HTTP API
of ``needle up``, whose projections run in a child process): it follows the committed checkpoint
in Postgres, with the same ``seq`` / ``wait_for`` surface as the worker."""
from __future__ import annotations

import asyncio

import asyncpg
import structlog

from .progress import Progress
from .schema import PROJECTION

log = structlog.get_logger("needle.projections")
POLL_S = 0.02


class CheckpointFollower(Progress):
    def __init__(self, pool: asyncpg.Pool, health: dict[str, bool] | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.health = health if health is not None else {}

    async def poll_once(self) -> None:
        value = await self.pool.fetchval("SELECT seq FROM checkpoints WHERE projection = $1", PROJECTION)
        if value is not None:
            await self.advance(int(value))

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
                self.health["postgres"] = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # tables not migrated yet, Postgres restarting...
                self.health["postgres"] = False
                log.debug("checkpoint not readable", error=repr(exc))
                await asyncio.sleep(0.5)
            await asyncio.sleep(POLL_S)
