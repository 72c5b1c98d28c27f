"""The retention policy (个人信息保护): a closed issue's free text is crypto-shredded ``retention.closed_text``
after it was closed (rulebook; unset: kept).

Runs beside the projection worker (one per needle): every ``NEEDLE_RETENTION_SWEEP_S`` it asks the read models
for closed issues past the period whose text is not shredded yet, and for each one checks the issue itself
(the decider: still closed, closed long enough), destroys its data key (shared/privacy/issuekeys.py), then
records ``issue_text_shredded``. The key goes first: a crash in between leaves an issue whose text is gone and
that the next sweep records (destroying is idempotent), never a recorded shred whose text is still readable.
The facts stay: category, grid, dates, tasks, clocks, rates.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

import asyncpg
import structlog

from shared.commanding import execute, load_current_state, utcnow
from shared.config import Rulebook
from shared.domain import commands as cmd
from shared.domain.errors import DomainError
from shared.domain.issue import decide
from shared.privacy.issuekeys import IssueKeys
from shared.store.eventstore import EventStore

log = structlog.get_logger("needle.retention")
ACTOR = "needle/retention"
BATCH = 200


async def shred_issue(store: EventStore, keys: IssueKeys, issue_id: str, *, by: str, reason: str,
                      retention: timedelta | None, now: datetime) -> bool:
    """Shred one issue's free text if the decider allows it now (DomainError otherwise). True when recorded."""
    state, _ = await load_current_state(store, issue_id)
    key_id = await keys.key_id_of(issue_id)
    command = cmd.ShredText(by=by, reason=reason, key_id=key_id, retention=retention)
    decide(state, command, now)  # refuses before anything is destroyed
    await keys.destroy(issue_id)
    out = await execute(store, issue_id, lambda st, t: decide(st, command, t), actor=by, source=ACTOR,
                        clock=lambda: now)
    return bool(out.envelopes)


class RetentionSweeper:
    def __init__(self, pool: asyncpg.Pool, store: EventStore, keys: IssueKeys, rulebook: Callable[[], Rulebook], *,
                 every_s: float, clock: Callable[[], datetime] = utcnow) -> None:
        self.pool, self.store, self.keys, self.rulebook = pool, store, keys, rulebook
        self.every_s, self.clock = every_s, clock
        self.shredded = 0

    async def due(self, now: datetime, period: timedelta, limit: int = BATCH) -> list[str]:
        rows = await self.pool.fetch(
            "SELECT id FROM issues WHERE status = 'closed' AND closed_at <= $1 AND text_shredded_at IS NULL "
            "ORDER BY closed_at LIMIT $2", now - period, limit)
        return [r["id"] for r in rows]

    async def sweep(self) -> int:
        """One pass: every closed issue past the period, in batches. Returns how many were shredded."""
        period = self.rulebook().text_retention
        if period is None:
            return 0
        done, skipped = 0, set[str]()
        while True:
            now = self.clock()
            ids = [i for i in await self.due(now, period, BATCH + len(skipped)) if i not in skipped]
            if not ids:
                return done
            for issue_id in ids:
                try:
                    if await shred_issue(self.store, self.keys, issue_id, by=ACTOR, reason="retention",
                                         retention=period, now=now):
                        done += 1
                        self.shredded += 1
                        log.info("issue text shredded", issue=issue_id, reason="retention")
                except DomainError as exc:  # reopened, or the read models are behind: the next pass sees
                    log.info("issue text kept", issue=issue_id, why=str(exc))
                skipped.add(issue_id)  # recorded or refused: the read models catch up before the next pass

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS or Postgres away: the next pass tries again
                log.warning("retention sweep failed", error=repr(exc))
            await asyncio.sleep(self.every_s)
