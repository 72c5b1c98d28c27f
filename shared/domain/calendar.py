"""Which days are workdays: Chinese holidays, make-up workdays (调休) and fallbacks.

Pure except for :func:`load_holiday_file`, which reads the operator's YAML file. A
:class:`WorkCalendar` answers ``is_workday(d)`` from, in order:

1. the operator-supplied holiday file, for the years it lists (it wins even over
   years the ``chinese_calendar`` package knows: operators correct errata this way);
2. the ``chinese_calendar`` package (official State Council schedules, 2004–2026 for
   chinesecalendar 1.11);
3. Monday–Friday, logging one warning per unknown year and calendar; never raising.

Kinds: ``cn_workdays`` (the chain above), ``weekdays`` (Monday–Friday only, the
holiday file is ignored) and ``natural`` (every day is a workday; working hours still
apply to a working clock).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Final, Literal

import chinese_calendar
import yaml

__all__ = [
    "CALENDAR_KINDS",
    "CalendarKind",
    "HolidayOverrides",
    "WorkCalendar",
    "YearOverrides",
    "load_holiday_file",
    "parse_holiday_overrides",
]

log = logging.getLogger("needle.calendar")

CalendarKind = Literal["cn_workdays", "weekdays", "natural"]
CALENDAR_KINDS: Final[frozenset[str]] = frozenset({"cn_workdays", "weekdays", "natural"})


@dataclass(frozen=True, slots=True)
class YearOverrides:
    """One year of the operator's schedule.

    ``holidays`` are days off (listing weekend days too is harmless); ``workdays`` are
    make-up workdays (调休), usually weekend days. Every other day is a workday
    exactly when it is Monday–Friday.
    """

    year: int
    source: str
    holidays: frozenset[date] = frozenset()
    workdays: frozenset[date] = frozenset()

    def is_workday(self, d: date) -> bool:
        """Whether ``d`` (a day of this year) is a workday under this schedule."""
        if d in self.workdays:
            return True
        if d in self.holidays:
            return False
        return d.weekday() < 5

    @property
    def estimated(self) -> bool:
        """True when the schedule is a guess, not an official notice."""
        return self.source.strip().lower() == "estimate"


@dataclass(frozen=True, slots=True)
class HolidayOverrides:
    """The operator's holiday schedules, by year."""

    years: Mapping[int, YearOverrides] = field(default_factory=dict)

    def covers(self, year: int) -> bool:
        return year in self.years

    def is_workday(self, d: date) -> bool | None:
        """The operator's answer for ``d``, or None when its year is not covered."""
        y = self.years.get(d.year)
        return None if y is None else y.is_workday(d)


def _parse_day(value: Any, where: str) -> date:
    if isinstance(value, datetime):  # a datetime is a date subclass: refuse it explicitly
        raise ValueError(f"{where}: {value!r} is a timestamp, expected a day (YYYY-MM-DD)")
    if isinstance(value, date):  # YAML turns unquoted 2027-01-01 into a date already
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{where}: {value!r} is not a day (YYYY-MM-DD)")


def _parse_days(raw: Any, year: int, where: str) -> frozenset[date]:
    if raw is None:
        return frozenset()
    if not isinstance(raw, list):
        raise ValueError(f"{where}: expected a list of days (YYYY-MM-DD), got {type(raw).__name__}")
    days: set[date] = set()
    for i, value in enumerate(raw):
        d = _parse_day(value, f"{where}[{i}]")
        if d.year != year:
            raise ValueError(f"{where}[{i}]: {d.isoformat()} is not in year {year}")
        days.add(d)
    return frozenset(days)


def parse_holiday_overrides(data: Any, origin: str = "<holiday file>") -> HolidayOverrides:
    """Validate an already-parsed holiday document (see ``deploy/calendar/cn-holidays.yaml``).

    Raises ValueError naming ``origin`` and the offending entry.
    """
    if not isinstance(data, Mapping) or set(data) != {"years"}:
        raise ValueError(f"{origin}: expected a mapping with the single key 'years'")
    raw_years = data["years"]
    if raw_years is None:
        return HolidayOverrides({})
    if not isinstance(raw_years, Mapping):
        raise ValueError(f"{origin}: 'years' must map a year to its schedule")
    years: dict[int, YearOverrides] = {}
    for key, body in raw_years.items():
        where = f"{origin}: years.{key}"
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.isdigit())):
            raise ValueError(f"{where}: the key must be a year such as 2027")
        year = int(key)
        if not 1900 <= year <= 2200:
            raise ValueError(f"{where}: year out of range")
        if year in years:
            raise ValueError(f"{where}: year listed twice")
        if not isinstance(body, Mapping):
            raise ValueError(f"{where}: expected a mapping with source, holidays, workdays")
        unknown = set(body) - {"source", "holidays", "workdays"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(map(str, unknown))}")
        source = body.get("source")
        if not isinstance(source, str | int) or not str(source).strip():
            raise ValueError(f"{where}.source: required (the State Council notice, or 'estimate')")
        holidays = _parse_days(body.get("holidays"), year, f"{where}.holidays")
        workdays = _parse_days(body.get("workdays"), year, f"{where}.workdays")
        both = holidays & workdays
        if both:
            first = min(both).isoformat()
            raise ValueError(f"{where}: {first} is listed both as a holiday and as a workday")
        years[year] = YearOverrides(year, str(source).strip(), holidays, workdays)
    return HolidayOverrides(years)


def load_holiday_file(path: str | Path) -> HolidayOverrides:
    """Read and validate the operator's holiday YAML file (the only IO in this module).

    Logs a warning for each year whose ``source`` is ``estimate``.
    """
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML: {exc}") from exc
    overrides = parse_holiday_overrides(data, str(p))
    for y in sorted(overrides.years.values(), key=lambda y: y.year):
        if y.estimated:
            log.warning("holiday schedule for %d in %s is an estimate; replace it with the official notice",
                        y.year, p)
    return overrides


class WorkCalendar:
    """Answers ``is_workday(d)``; answers are cached per day (thread-safe enough: a race
    only computes the same answer twice)."""

    __slots__ = ("_cache", "_kind", "_overrides", "_warned")

    def __init__(self, kind: str = "cn_workdays", overrides: HolidayOverrides | None = None) -> None:
        if kind not in CALENDAR_KINDS:
            raise ValueError(f"unknown calendar kind {kind!r}; expected one of {sorted(CALENDAR_KINDS)}")
        self._kind = kind
        self._overrides = overrides or HolidayOverrides({})
        self._cache: dict[date, bool] = {}
        self._warned: set[int] = set()

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def overrides(self) -> HolidayOverrides:
        return self._overrides

    def __repr__(self) -> str:
        return f"WorkCalendar({self._kind!r}, overrides for {sorted(self._overrides.years)})"

    def is_workday(self, d: date) -> bool:
        """Whether ``d`` is a workday. Never raises for a valid date."""
        try:
            return self._cache[d]
        except KeyError:
            pass
        if isinstance(d, datetime):
            d = d.date()
        answer = self._compute(d)
        self._cache[d] = answer
        return answer

    def _compute(self, d: date) -> bool:
        if self._kind == "natural":
            return True
        if self._kind == "weekdays":
            return d.weekday() < 5
        operator = self._overrides.is_workday(d)
        if operator is not None:
            return operator
        try:
            return bool(chinese_calendar.is_workday(d))
        except NotImplementedError:
            if d.year not in self._warned:
                self._warned.add(d.year)
                log.warning(
                    "no holiday schedule for %d (neither the holiday file nor chinese_calendar knows it); "
                    "counting Monday-Friday as workdays. Add the year to the holiday file.",
                    d.year,
                )
            return d.weekday() < 5
