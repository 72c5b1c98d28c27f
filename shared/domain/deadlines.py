"""Deadline arithmetic for SLA clocks. Pure: no IO, never reads the clock.

Two clocks (see the rulebook contract in DESIGN.md):

``natural``
    Real elapsed time: ``due = start + duration`` (P2D is 48 hours). Holidays and
    working hours do not matter (sea safety, PT1H, on Qingming is still one hour).

``working``
    Only time inside the working windows (``working_hours``, wall-clock in ``tz``) of
    workdays (``WorkCalendar``) counts. The rules:

    * Start outside working time (evening, lunch, weekend, holiday): counting begins
      at the next working moment (18:00 Friday -> Monday 08:30, or the first workday
      after a holiday; 12:30 -> 13:30).
    * ``days`` of a duration are working DAYS, the rest working hours. One working day
      is one full day of windows (7.5 h for 08:30-12:00, 13:30-17:30), so N working
      days land on the same wall-clock time of the Nth following workday, measured from
      the (moved) start: 10:00 Wednesday + P2D -> 10:00 Friday, skipping holidays and
      counting make-up workdays (调休). Mixed P1DT2H is one working day, then 2 hours.
    * The due time is the EARLIEST instant at which the clock's whole amount has
      elapsed. So a due that falls exactly on a window boundary is the end of the
      window, not the start of the next one: Monday 08:30 + P2D is Tuesday 17:30 (the
      same working instant as Wednesday 08:30), Monday 10:00 + PT2H is 12:00, and a
      report at 18:00 Friday with P2D is due Tuesday 17:30 ("Monday and Tuesday").
    * A zero duration is due at ``start`` itself.

    Because of the last two rules, ``working_time_between(start, add_duration(start, d))``
    equals ``d`` in working time for every start, and ``add_duration`` is monotonic.

Durations: ``timedelta`` normalises PT36H to "1 day 12 hours", which the working clock
reads as one working day plus 12 working hours. To mean 36 working hours pass the ISO
8601 text ("PT36H") or a :class:`SlaDuration`, which keep days and hours apart.

Times: inputs must be timezone-aware (any zone; naive raises ValueError); outputs are
aware UTC. Working time is measured on the wall clock of ``tz`` (exact for Asia/Shanghai,
which has no DST; in DST zones a transition day is measured in wall-clock time).
Working clock cost is O(days spanned) with one cached workday lookup per day.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from functools import lru_cache
from typing import Literal, TypeAlias

from shared.domain.calendar import WorkCalendar

__all__ = [
    "Clock",
    "DurationLike",
    "SlaDuration",
    "WorkingHours",
    "add_duration",
    "daily_working_time",
    "extend_due",
    "parse_working_hours",
    "paused_due",
    "warn_time",
    "working_time_between",
]

WorkingHours: TypeAlias = tuple[tuple[time, time], ...]
Clock: TypeAlias = Literal["natural", "working"]

ZERO = timedelta(0)
_DAY = timedelta(days=1)
_MIDNIGHT = time(0)
_MAX_DAYS_WALKED = 366 * 30  # a calendar with no workday for 30 years is a configuration error

_ISO_DURATION = re.compile(
    r"P(?:(?P<d>\d+)D)?(?:T(?=\d)(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d{1,6})?)S)?)?"
)


@dataclass(frozen=True, slots=True)
class SlaDuration:
    """A clock's length: whole ``days`` (working days on the working clock) plus ``time``."""

    days: int = 0
    time: timedelta = ZERO

    def __post_init__(self) -> None:
        if isinstance(self.days, bool) or not isinstance(self.days, int) or self.days < 0:
            raise ValueError(f"days must be a non-negative integer, got {self.days!r}")
        if self.time < ZERO:
            raise ValueError(f"time must not be negative, got {self.time!r}")

    @classmethod
    def parse(cls, text: str) -> SlaDuration:
        """Parse ISO 8601 ``PnDTnHnMnS`` (no years, months or weeks: write P7D, not P1W)."""
        m = _ISO_DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
        if m is None or text.strip() in ("P", "PT"):
            raise ValueError(f"not an ISO 8601 duration of days/hours/minutes/seconds: {text!r}")
        return cls(
            days=int(m["d"] or 0),
            time=timedelta(hours=int(m["h"] or 0), minutes=int(m["m"] or 0), seconds=float(m["s"] or 0)),
        )

    @classmethod
    def of(cls, value: DurationLike) -> SlaDuration:
        """Accept a SlaDuration, an ISO 8601 string, or a timedelta (whose ``.days`` are days)."""
        if isinstance(value, SlaDuration):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, timedelta):
            if value < ZERO:
                raise ValueError(f"duration must not be negative, got {value!r}")
            return cls(days=value.days, time=value - timedelta(days=value.days))
        raise TypeError(f"expected a timedelta, SlaDuration or ISO 8601 string, got {type(value).__name__}")

    def natural(self) -> timedelta:
        """Length on the natural clock (a day is 24 hours)."""
        return timedelta(days=self.days) + self.time

    def working(self, working_hours: WorkingHours) -> timedelta:
        """Length on the working clock (a day is one full day of working windows)."""
        return self.days * daily_working_time(working_hours) + self.time


DurationLike: TypeAlias = timedelta | str | SlaDuration


def parse_working_hours(spec: Sequence[str] | str) -> WorkingHours:
    """Parse the rulebook form ``["08:30-12:00", "13:30-17:30"]`` (validated)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    windows: list[tuple[time, time]] = []
    for item in items:
        try:
            a, b = (part.strip() for part in str(item).split("-"))
            windows.append((time.fromisoformat(a), time.fromisoformat(b)))
        except ValueError as exc:
            raise ValueError(f"working hours window {item!r} is not like '08:30-12:00'") from exc
    result = tuple(windows)
    _windows(result)  # validate
    return result


@lru_cache(maxsize=64)
def _windows(working_hours: WorkingHours) -> tuple[tuple[tuple[timedelta, timedelta], ...], timedelta]:
    """Windows as offsets from midnight, and their daily total. Validates."""
    if not working_hours:
        raise ValueError("working hours need at least one window")
    out: list[tuple[timedelta, timedelta]] = []
    prev_end = ZERO
    for window in working_hours:
        if len(window) != 2 or not all(isinstance(t, time) and t.tzinfo is None for t in window):
            raise ValueError(f"working hours window {window!r} must be a pair of naive times")
        ws, we = (timedelta(hours=t.hour, minutes=t.minute, seconds=t.second, microseconds=t.microsecond)
                  for t in window)
        if not ws < we:
            raise ValueError(f"working hours window {window!r} must start before it ends")
        if ws < prev_end:
            raise ValueError(f"working hours windows must be sorted and must not overlap: {working_hours!r}")
        out.append((ws, we))
        prev_end = we
    return tuple(out), sum((we - ws for ws, we in out), ZERO)


def _spec(working_hours: WorkingHours) -> tuple[tuple[tuple[timedelta, timedelta], ...], timedelta]:
    try:
        return _windows(working_hours)
    except TypeError:  # unhashable (lists from a config loader): normalise, then cache
        return _windows(tuple((w[0], w[1]) for w in working_hours))


def daily_working_time(working_hours: WorkingHours) -> timedelta:
    """The length of one working day (7.5 h for 08:30-12:00, 13:30-17:30)."""
    return _spec(working_hours)[1]


def _check_aware(value: datetime, name: str) -> None:
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (got naive {value.isoformat()})")


def _to_local(value: datetime, tz: tzinfo, name: str) -> datetime:
    _check_aware(value, name)
    return value.astimezone(tz).replace(tzinfo=None)


def _to_utc(local: datetime, tz: tzinfo) -> datetime:
    return local.replace(tzinfo=tz).astimezone(UTC)


def _check_clock(clock: str) -> None:
    if clock not in ("natural", "working"):
        raise ValueError(f"unknown clock {clock!r}; expected 'natural' or 'working'")


def _day_part(cal: WorkCalendar, d: date, a: timedelta, b: timedelta,
              wins: tuple[tuple[timedelta, timedelta], ...]) -> timedelta:
    """Working time of day ``d`` between offsets ``a`` and ``b`` from midnight."""
    if a >= b or not cal.is_workday(d):
        return ZERO
    total = ZERO
    for ws, we in wins:
        lo, hi = max(a, ws), min(b, we)
        if lo < hi:
            total += hi - lo
    return total


def _between_local(cal: WorkCalendar, s: datetime, e: datetime, working_hours: WorkingHours) -> timedelta:
    """Working time in [s, e) for naive local s <= e."""
    wins, daily = _spec(working_hours)
    sd, ed = s.date(), e.date()
    s_off = s - datetime.combine(sd, _MIDNIGHT)
    e_off = e - datetime.combine(ed, _MIDNIGHT)
    if sd == ed:
        return _day_part(cal, sd, s_off, e_off, wins)
    total = _day_part(cal, sd, s_off, _DAY, wins) + _day_part(cal, ed, ZERO, e_off, wins)
    d = sd + _DAY
    while d < ed:
        if cal.is_workday(d):
            total += daily
        d += _DAY
    return total


def _add_local(cal: WorkCalendar, s: datetime, amount: timedelta, working_hours: WorkingHours) -> datetime:
    """The earliest naive local instant at which ``amount`` of working time has elapsed since ``s``."""
    if amount <= ZERO:
        return s
    wins, daily = _spec(working_hours)
    d = s.date()
    off = s - datetime.combine(d, _MIDNIGHT)
    for _ in range(_MAX_DAYS_WALKED):
        if cal.is_workday(d):
            if off == ZERO and amount > daily:
                amount -= daily  # a whole working day, skipped in one step
            else:
                for ws, we in wins:
                    if off >= we:
                        continue
                    seg = max(off, ws)  # outside a window: the next working moment
                    avail = we - seg
                    if amount <= avail:
                        return datetime.combine(d, _MIDNIGHT) + seg + amount
                    amount -= avail
        d += _DAY
        off = ZERO
    raise ValueError(f"calendar {cal!r} has no workday within {_MAX_DAYS_WALKED} days of {s.date()}")


def add_duration(start: datetime, duration: DurationLike, *, clock: Clock, calendar: WorkCalendar,
                 working_hours: WorkingHours, tz: tzinfo) -> datetime:
    """The due time of a clock of length ``duration`` started at ``start`` (aware UTC).

    See the module docstring for the working-clock rules (start outside working time,
    whole days, boundaries). Raises ValueError on naive datetimes or negative durations.
    """
    _check_clock(clock)
    _check_aware(start, "start")
    length = SlaDuration.of(duration)
    if clock == "natural":
        return start.astimezone(UTC) + length.natural()
    amount = length.working(working_hours)
    return _to_utc(_add_local(calendar, _to_local(start, tz, "start"), amount, working_hours), tz)


def working_time_between(start: datetime, end: datetime, *, clock: Clock, calendar: WorkCalendar,
                         working_hours: WorkingHours, tz: tzinfo) -> timedelta:
    """Time elapsed on the clock from ``start`` to ``end`` (negative when end < start).

    Natural: ``end - start``. Working: the time inside working windows of workdays.
    """
    _check_clock(clock)
    _check_aware(start, "start")
    _check_aware(end, "end")
    if clock == "natural":
        return end.astimezone(UTC) - start.astimezone(UTC)
    s, e = _to_local(start, tz, "start"), _to_local(end, tz, "end")
    if e < s:
        return -_between_local(calendar, e, s, working_hours)
    return _between_local(calendar, s, e, working_hours)


def warn_time(start: datetime, due: datetime, warn_at: float, *, clock: Clock, calendar: WorkCalendar,
              working_hours: WorkingHours, tz: tzinfo) -> datetime:
    """The moment ``warn_at`` (0..1) of the clock from ``start`` to ``due`` has elapsed (预警).

    Natural: ``start + (due - start) * warn_at``. Working: the earliest moment ``t`` with
    ``working_time_between(start, t) == warn_at * working_time_between(start, due)``
    (rounded to the microsecond), so an 8-working-hour clock set Friday 16:00 warns
    after 6.4 working hours, on Monday. Always ``start <= result <= due``.
    """
    if not 0.0 <= warn_at <= 1.0:
        raise ValueError(f"warn_at must be within 0..1, got {warn_at!r}")
    total = working_time_between(start, due, clock=clock, calendar=calendar, working_hours=working_hours, tz=tz)
    if total <= ZERO:
        return start.astimezone(UTC)
    return add_duration(start, SlaDuration(time=total * warn_at), clock=clock, calendar=calendar,
                        working_hours=working_hours, tz=tz)


def paused_due(due: datetime, paused_at: datetime, resumed_at: datetime, *, clock: Clock,
               calendar: WorkCalendar, working_hours: WorkingHours, tz: tzinfo) -> datetime:
    """Move ``due`` for a clock paused at ``paused_at`` and resumed at ``resumed_at``.

    The time that was left on the clock when it paused (natural or working time) is
    preserved from the resume. A clock already overdue when paused has nothing left:
    it is due at the resume. Also fits a warning time (pass the warn time as ``due``).
    """
    _check_aware(resumed_at, "resumed_at")
    _check_aware(paused_at, "paused_at")
    if resumed_at < paused_at:
        raise ValueError(f"resumed_at {resumed_at.isoformat()} is before paused_at {paused_at.isoformat()}")
    elapsed_to_due = working_time_between(paused_at, due, clock=clock, calendar=calendar,
                                          working_hours=working_hours, tz=tz)
    return add_duration(resumed_at, SlaDuration(time=max(ZERO, elapsed_to_due)), clock=clock, calendar=calendar,
                        working_hours=working_hours, tz=tz)


def extend_due(due: datetime, extension: DurationLike, *, clock: Clock, calendar: WorkCalendar,
               working_hours: WorkingHours, tz: tzinfo) -> datetime:
    """延期: the due time after an approved extension, added on the same clock.

    On the working clock whole days are working days (P2D: two more working days).
    """
    return add_duration(due, extension, clock=clock, calendar=calendar, working_hours=working_hours, tz=tz)
