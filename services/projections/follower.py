"""The read models as seen from a process that does not run the projection worker (the HTTP API
of ``needle up``, whose projections run in a child process): it follows the committed checkpoint
in Postgres, with the same ``seq`` / ``wait_for`` surface as the worker.

The worker's commit sends ``NOTIFY needle_checkpoint, '<seq>'`` in the same transaction (Postgres
delivers it at the commit, never for a rolled-back batch), so a ``Needle-Min-Seq`` wait ends as soon
as the rows are there. It used to poll the checkpoint every 20 ms: up to 20 ms more per read-your-write
and 50 queries/s from the intake's loop on a saturated 2-core machine. A slow poll on the listening
connection stays as the fallback (a notification lost while reconnecting, a rebuild's swap) and as the
liveness check of that connection."""
from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import structlog

from .progress import Progress
from .schema import PROJECTION

log = structlog.get_logger("needle.projections")
CHANNEL = "needle_checkpoint"
POLL_S = 0.25  # the fallback poll; the notification is the fast path


class CheckpointFollower(Progress):
    def __init__(self, pool: asyncpg.Pool, health: dict[str, bool] | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.health = health if health is not None else {}
        self._pending: set[asyncio.Task[None]] = set()

    async def poll_once(self, conn: Any = None) -> None:
        value = await (conn or self.pool).fetchval("SELECT seq FROM checkpoints WHERE projection = $1", PROJECTION)
        if value is not None:
            await self.advance(int(value))

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            seq = int(payload)
        except ValueError:
            return
        if seq > self.seq:
            task = asyncio.get_running_loop().create_task(self.advance(seq))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def run(self) -> None:
        while True:
            try:
                async with self.pool.acquire() as conn:
                    await conn.add_listener(CHANNEL, self._notified)
                    try:
                        while True:  # LISTEN first, then read: nothing committed in between is missed
                            await self.poll_once(conn)
                            self.health["postgres"] = True
                            await asyncio.sleep(POLL_S)
                    finally:
                        if not conn.is_closed():
                            await conn.remove_listener(CHANNEL, self._notified)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # tables not migrated yet, Postgres restarting...
                self.health["postgres"] = False
                log.debug("checkpoint not readable", error=repr(exc))
                await asyncio.sleep(0.5)
