"""What a service started in a process hands back to that process: its background tasks (with a health flag
each), what to close when the process stops, and who must hear of a newly published rulebook.

Each service's ``start_*`` function takes the parts it needs as arguments plus one :class:`Lifecycle`, and
returns a handle of its own; the composition root (``services/entrypoints/stack.py``) owns the lifecycle and
closes it. Nothing here knows which services exist."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("needle.lifecycle")
TASK_STOP_S = 5.0  # how long close() waits for its cancelled tasks


@dataclass
class Lifecycle:
    health: dict[str, bool] = field(default_factory=dict)
    """component -> up; /healthz reads it."""
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    rule_holders: list[Callable[[Any], None]] = field(default_factory=list)

    def spawn(self, name: str, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``coro`` until close(); its health flag ``name`` is up while it runs and down if it crashes."""

        async def guarded() -> None:
            self.health[name] = True
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker crashed", worker=name)
                self.health[name] = False
                raise

        task = asyncio.create_task(guarded(), name=name)
        self.tasks.append(task)
        return task

    def on_close(self, closer: Callable[[], Awaitable[Any]]) -> None:
        """``closer`` runs when the process stops (last registered, first run)."""
        self.closers.append(closer)

    def close_on_exit(self, sub: Any) -> None:
        """Unsubscribe ``sub`` before draining: a pull subscription cancelled mid-fetch otherwise holds
        the drain until its timeout."""
        self.closers.append(sub.unsubscribe)

    def on_rulebook(self, holder: Callable[[Any], None]) -> None:
        """``holder(rulebook)`` is called for every rulebook put in force after start."""
        self.rule_holders.append(holder)

    def apply_rulebook(self, rulebook: Any) -> None:
        for holder in self.rule_holders:
            holder(rulebook)

    async def close(self) -> None:
        """Cancel the tasks (bounded wait), then run the closers last-first, each bounded."""
        for t in self.tasks:
            t.cancel()
        if self.tasks:
            # bounded: a cancellation can be lost inside a library (seen: the rulebook follower, cancelled while its
            # subscription was being created, went on waiting for messages); closing the connection ends it
            done, stuck = await asyncio.wait(self.tasks, timeout=TASK_STOP_S)
            for t in done:
                if not t.cancelled():
                    t.exception()  # retrieved: guarded() logged it when it crashed
            for t in stuck:
                log.warning("a task did not stop when cancelled; closing the connection ends it", task=t.get_name())
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closer(), 5)
