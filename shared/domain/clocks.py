"""SLA clocks for a dispatch: due and warning times from the rulebook. Pure."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.config import Rulebook
from shared.domain.calendar import WorkCalendar
from shared.domain.deadlines import add_duration, extend_due, paused_due, warn_time
from shared.domain.issue import TaskState


@dataclass(frozen=True, slots=True)
class Deadlines:
    clock: str
    acknowledge_due: datetime
    resolve_due: datetime
    acknowledge_warn: datetime
    resolve_warn: datetime


@dataclass(frozen=True)
class SlaClocks:
    calendar: WorkCalendar

    def _kw(self, rulebook: Rulebook, clock: str) -> dict[str, object]:
        return {"clock": clock, "calendar": self.calendar, "working_hours": rulebook.working_hours, "tz": rulebook.tz}

    def for_dispatch(self, rulebook: Rulebook, category: str, urgency: str, now: datetime) -> Deadlines:
        sla = rulebook.sla_for(category, urgency)
        kw = self._kw(rulebook, sla.clock)
        ack_due = add_duration(now, sla.acknowledge, **kw)  # type: ignore[arg-type]
        res_due = add_duration(now, sla.resolve, **kw)  # type: ignore[arg-type]
        return Deadlines(
            clock=sla.clock,
            acknowledge_due=ack_due,
            resolve_due=res_due,
            acknowledge_warn=warn_time(now, ack_due, rulebook.warn_at, **kw),  # type: ignore[arg-type]
            resolve_warn=warn_time(now, res_due, rulebook.warn_at, **kw),  # type: ignore[arg-type]
        )

    def extend(self, rulebook: Rulebook, task: TaskState, extension: timedelta) -> tuple[datetime, datetime]:
        """延期: the new resolve due and warning times of ``task`` after ``extension``."""
        kw = self._kw(rulebook, task.clock)
        due = extend_due(task.resolve_due, extension, **kw)  # type: ignore[arg-type]
        return due, warn_time(task.dispatched_at, due, rulebook.warn_at, **kw)  # type: ignore[arg-type]

    def resume(self, rulebook: Rulebook, task: TaskState, now: datetime, since: datetime | None = None) -> Deadlines:
        """缓办 (or an info request's pause, 补充材料) ended at ``now``: every clock edge of ``task`` keeps the time
        that was left on it when the clocks paused (``since``, by default ``suspended_at``); an edge already past
        when they paused is due at the resume."""
        paused_at = since or task.suspended_at
        assert paused_at is not None
        kw = self._kw(rulebook, task.clock)

        def moved(at: datetime) -> datetime:
            return paused_due(at, paused_at, now, **kw)  # type: ignore[arg-type]

        return Deadlines(clock=task.clock, acknowledge_due=moved(task.acknowledge_due),
                         resolve_due=moved(task.resolve_due), acknowledge_warn=moved(task.acknowledge_warn),
                         resolve_warn=moved(task.resolve_warn))

    def reassigned(self, rulebook: Rulebook, category: str, urgency: str, old: TaskState, now: datetime,
                   mode: str) -> Deadlines:
        """改派: the new task's clocks. ``restart``: fresh clocks from ``now``, as for a dispatch. ``continue``: the
        resolve clock keeps the old task's due and warning times; the new department still has a fresh
        acknowledge clock (it was not told before)."""
        fresh = self.for_dispatch(rulebook, category, urgency, now)
        if mode != "continue":
            return fresh
        return Deadlines(clock=old.clock, acknowledge_due=min(fresh.acknowledge_due, old.resolve_due),
                         resolve_due=old.resolve_due, acknowledge_warn=min(fresh.acknowledge_warn, old.resolve_due),
                         resolve_warn=old.resolve_warn)
