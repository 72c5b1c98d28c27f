"""Deadline arithmetic: concrete 12345 / 数字城管 cases, then properties."""
from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shared.domain.calendar import WorkCalendar, load_holiday_file
from shared.domain.deadlines import (
    Clock,
    DurationLike,
    SlaDuration,
    add_duration,
    daily_working_time,
    extend_due,
    parse_working_hours,
    paused_due,
    warn_time,
    working_time_between,
)

TZ = ZoneInfo("Asia/Shanghai")
HOURS = parse_working_hours(["08:30-12:00", "13:30-17:30"])
HOLIDAY_FILE = Path(__file__).resolve().parents[2] / "deploy" / "calendar" / "cn-holidays.yaml"
CAL = WorkCalendar("cn_workdays", load_holiday_file(HOLIDAY_FILE))
US = timedelta(microseconds=1)


def bj(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    """A Beijing wall-clock time as an aware UTC datetime."""
    return datetime(year, month, day, hour, minute, tzinfo=TZ).astimezone(UTC)


def due(start: datetime, duration: DurationLike, clock: Clock = "working", calendar: WorkCalendar = CAL) -> datetime:
    return add_duration(start, duration, clock=clock, calendar=calendar, working_hours=HOURS, tz=TZ)


def between(a: datetime, b: datetime, clock: Clock = "working") -> timedelta:
    return working_time_between(a, b, clock=clock, calendar=CAL, working_hours=HOURS, tz=TZ)


def warn(start: datetime, end: datetime, warn_at: float, clock: Clock = "working") -> datetime:
    return warn_time(start, end, warn_at, clock=clock, calendar=CAL, working_hours=HOURS, tz=TZ)


def pause(end: datetime, paused: datetime, resumed: datetime, clock: Clock = "working") -> datetime:
    return paused_due(end, paused, resumed, clock=clock, calendar=CAL, working_hours=HOURS, tz=TZ)


def extend(end: datetime, extension: DurationLike, clock: Clock = "working") -> datetime:
    return extend_due(end, extension, clock=clock, calendar=CAL, working_hours=HOURS, tz=TZ)


# -- concrete cases ------------------------------------------------------------------------

def test_working_hours_parse() -> None:
    assert HOURS == ((time(8, 30), time(12)), (time(13, 30), time(17, 30)))
    assert daily_working_time(HOURS) == timedelta(hours=7, minutes=30)
    for bad in (["08:30"], ["12:00-08:30"], ["08:30-12:00", "11:00-17:30"], []):
        with pytest.raises(ValueError):
            parse_working_hours(bad)


def test_two_working_days_before_national_day_2026_skip_the_holiday() -> None:
    # Wed Sep 30 is the last workday before 国庆 (Oct 1-7); Oct 8 is day 1, Oct 9 day 2.
    assert due(bj(2026, 9, 30, 10), "P2D") == bj(2026, 10, 9, 10)
    # Fri Sep 25 is 中秋 (a holiday): counting starts Mon Sep 28 08:30 -> due Tue 17:30
    assert due(bj(2026, 9, 25, 10), "P2D") == bj(2026, 9, 29, 17, 30)


def test_two_working_days_set_on_the_friday_before_national_day_is_not_due_on_monday() -> None:
    # Fri Oct 9 2026 (after 国庆): Sat Oct 10 is a make-up workday -> day 1, Mon Oct 12 day 2
    assert due(bj(2026, 10, 9, 10), "P2D") == bj(2026, 10, 12, 10)
    # Mon-Fri alone would also skip the weekend, yet Oct 1-2 are holidays in cn_workdays
    assert due(bj(2026, 9, 30, 10), "P2D") != due(bj(2026, 9, 30, 10), "P2D", calendar=WorkCalendar("weekdays"))
    # 2025: Fri Sep 26; Sun Sep 28 is a make-up workday (day 1), so day 2 IS Monday Sep 29
    assert due(bj(2025, 9, 26, 10), "P2D") == bj(2025, 9, 29, 10)


def test_four_working_hours_from_friday_afternoon() -> None:
    # 16:00-17:30 Fri = 1.5 h, then 2.5 h from Mon 08:30 -> 11:00
    assert due(bj(2026, 3, 13, 16), "PT4H") == bj(2026, 3, 16, 11)
    # lunch excluded: 10:00-12:00 = 2 h, then 13:30-15:30
    assert due(bj(2026, 3, 16, 10), "PT4H") == bj(2026, 3, 16, 15, 30)


def test_make_up_saturday_counts_as_a_workday() -> None:
    assert due(bj(2026, 10, 9, 16), "PT4H") == bj(2026, 10, 10, 11)


def test_report_after_hours_starts_counting_next_working_morning() -> None:
    # 12345: 18:00 Friday with 2 working days counts Monday and Tuesday
    assert due(bj(2026, 3, 13, 18), "P2D") == bj(2026, 3, 17, 17, 30)
    assert due(bj(2026, 3, 16, 12, 30), "PT1H") == bj(2026, 3, 16, 14, 30)  # lunch -> 13:30
    # a due that fills a window ends at the window's end, not at the next window's start
    assert due(bj(2026, 9, 30, 17), "PT4H") == bj(2026, 10, 8, 12)


def test_mixed_duration_days_then_hours() -> None:
    assert due(bj(2026, 3, 16, 10), "P1DT2H") == bj(2026, 3, 17, 12)
    # PT36H is 36 working hours; timedelta(hours=36) is 1 working day + 12 working hours
    assert due(bj(2026, 3, 16, 8, 30), "PT36H") == due(bj(2026, 3, 16, 8, 30), "P4DT6H")
    assert due(bj(2026, 3, 16, 8, 30), timedelta(hours=36)) == due(bj(2026, 3, 16, 8, 30), "P1DT12H")


def test_2027_uses_the_operator_file() -> None:
    # Thu Feb 4 2027 + 1 working day: Feb 5-14 off (estimate) -> Mon Feb 15
    assert due(bj(2027, 2, 4, 10), "P1D") == bj(2027, 2, 15, 10)
    # Fri Feb 19 + 1 working day: Sat Feb 20 is a make-up workday
    assert due(bj(2027, 2, 19, 10), "P1D") == bj(2027, 2, 20, 10)


def test_unknown_year_falls_back_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    cal = WorkCalendar()
    assert due(bj(2031, 1, 3, 16), "PT4H", calendar=cal) == bj(2031, 1, 6, 11)  # Fri -> Mon
    assert len([r for r in caplog.records if r.name == "needle.calendar"]) == 1


def test_natural_clock_ignores_holidays() -> None:
    # sea safety: PT1H on 清明 (Sun Apr 5 2026, a holiday) is one hour
    assert due(bj(2026, 4, 5, 10), "PT1H", "natural") == bj(2026, 4, 5, 11)
    assert due(bj(2026, 9, 30, 10), "P2D", "natural") == bj(2026, 10, 2, 10)


def test_inputs_and_outputs() -> None:
    out = due(datetime(2026, 3, 16, 10, tzinfo=TZ), "PT1H")
    assert out.tzinfo is UTC and out == bj(2026, 3, 16, 11)
    with pytest.raises(ValueError, match="timezone-aware"):
        due(datetime(2026, 3, 16, 10), "PT1H")
    with pytest.raises(ValueError, match="negative"):
        due(bj(2026, 3, 16, 10), timedelta(hours=-1))
    with pytest.raises(ValueError, match="clock"):
        due(bj(2026, 3, 16, 10), "PT1H", clock="lunar")  # type: ignore[arg-type]
    for bad in ("P", "PT", "P1W", "P1M", "1H", "P1DT"):
        with pytest.raises(ValueError):
            SlaDuration.parse(bad)
    assert SlaDuration.parse("P1DT2H30M5.5S") == SlaDuration(1, timedelta(hours=2, minutes=30, seconds=5.5))
    assert due(bj(2026, 3, 14, 10), "PT0S") == bj(2026, 3, 14, 10)


def test_warn_time() -> None:
    start = bj(2026, 3, 16, 8, 30)
    end = due(start, "PT8H")
    assert end == bj(2026, 3, 17, 9)
    # 0.8 x 8 h = 6.4 h: 3.5 h before lunch, 2.9 h after 13:30 -> 16:24
    assert warn(start, end, 0.8) == bj(2026, 3, 16, 16, 24)
    assert warn(start, end, 0.5, "natural") == start + (end - start) / 2
    with pytest.raises(ValueError):
        warn(start, end, 1.5)


def test_pause_and_extension() -> None:
    # due Tue 12:00, paused Mon 16:00 with 5 working hours left, resumed Wed 10:00
    moved = pause(bj(2026, 3, 17, 12), bj(2026, 3, 16, 16), bj(2026, 3, 18, 10))
    assert moved == bj(2026, 3, 18, 16, 30)
    # overdue when paused: due at resume
    late = pause(bj(2026, 3, 16, 12), bj(2026, 3, 16, 16), bj(2026, 3, 18, 10))
    assert late == bj(2026, 3, 18, 10)
    nat = pause(bj(2026, 3, 17, 12), bj(2026, 3, 16, 16), bj(2026, 3, 18, 10), "natural")
    assert nat == bj(2026, 3, 18, 10) + timedelta(hours=20)
    with pytest.raises(ValueError):
        pause(bj(2026, 3, 17, 12), bj(2026, 3, 16, 16), bj(2026, 3, 16, 15))
    # 延期 one working day from Wed Sep 30 2026 skips 国庆
    assert extend(bj(2026, 9, 30, 10), timedelta(days=1)) == bj(2026, 10, 8, 10)


# -- properties ----------------------------------------------------------------------------

starts = st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC))
times = st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=40))
durations = st.builds(SlaDuration, days=st.integers(0, 12), time=times)
PROPS = settings(max_examples=200, deadline=None)


def total(d: SlaDuration) -> timedelta:
    return d.working(HOURS)


@PROPS
@given(starts, durations, st.integers(0, 5), times)
def test_monotonic_in_duration(start: datetime, d: SlaDuration, more_days: int, more_time: timedelta) -> None:
    bigger = SlaDuration(d.days + more_days, d.time + more_time)
    assert start <= due(start, d) <= due(start, bigger)


@PROPS
@given(starts, st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=20)), durations)
def test_monotonic_in_start(start: datetime, later: timedelta, d: SlaDuration) -> None:
    assert due(start, d) <= due(start + later, d)
    assert due(start, d, "natural") <= due(start + later, d, "natural")


@PROPS
@given(starts, durations)
def test_working_time_round_trip_and_earliest(start: datetime, d: SlaDuration) -> None:
    # exact for every start, even outside working time (moving the start adds no working time)
    end = due(start, d)
    assert between(start, end) == total(d)
    if total(d) > timedelta(0):  # ...and the due is the earliest such instant
        assert between(start, end - US) < total(d)
    assert between(start, due(start, d, "natural"), "natural") == d.natural()


@PROPS
@given(st.dates(min_value=date(2024, 1, 1), max_value=date(2027, 12, 31)), st.sampled_from(HOURS),
       st.integers(1, 209), st.integers(1, 10))
def test_whole_days_keep_the_time_of_day(day: date, window: tuple[time, time], minute: int, n: int) -> None:
    """Strictly inside a window, P{n}D is the same wall time on the nth following workday."""
    assume(CAL.is_workday(day))
    local = datetime.combine(day, window[0], tzinfo=TZ) + timedelta(minutes=minute)
    assume(local.time() < window[1])
    out = due(local, f"P{n}D").astimezone(TZ)
    assert out.time() == local.time()
    expected, seen = day, 0
    while seen < n:
        expected += timedelta(days=1)
        seen += CAL.is_workday(expected)
    assert out.date() == expected


@settings(max_examples=100, deadline=None)
@given(st.datetimes(min_value=datetime(2025, 9, 1), max_value=datetime(2027, 2, 28)).map(
    lambda t: t.replace(second=0, microsecond=0, tzinfo=TZ)), st.integers(0, 600))
def test_agrees_with_minute_by_minute_reference(start: datetime, minutes: int) -> None:
    t, left = start.replace(tzinfo=None), minutes
    while left:
        in_window = any(a <= t.time() < b for a, b in HOURS)
        left -= CAL.is_workday(t.date()) and in_window
        t += timedelta(minutes=1)
    assert due(start, timedelta(minutes=minutes)) == t.replace(tzinfo=TZ).astimezone(UTC)


@PROPS
@given(starts, durations, st.floats(0, 1), st.sampled_from(["working", "natural"]))
def test_warn_time_between_start_and_due(start: datetime, d: SlaDuration, warn_at: float, clock: Clock) -> None:
    end = due(start, d, clock)
    at = warn(start, end, warn_at, clock)
    assert start <= at <= end
    assert between(start, at, clock) == between(start, end, clock) * warn_at


@PROPS
@given(starts, durations, st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=15)),
       st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=15)))
def test_pause_preserves_remaining_time(start: datetime, d: SlaDuration, until_pause: timedelta,
                                        paused_for: timedelta) -> None:
    end = due(start, d)
    paused, resumed = start + until_pause, start + until_pause + paused_for
    moved = pause(end, paused, resumed)
    remaining = max(timedelta(0), between(paused, end))
    assert between(resumed, moved) == remaining
    assert moved >= resumed
    if remaining:
        assert moved >= end
    nat_end = due(start, d, "natural")
    nat = pause(nat_end, paused, resumed, "natural")
    assert nat - resumed == max(timedelta(0), nat_end - paused)


@PROPS
@given(starts, durations, durations)
def test_extension_adds_working_time(start: datetime, d: SlaDuration, ext: SlaDuration) -> None:
    end = due(start, d)
    extended = extend(end, ext)
    assert extended >= end
    assert between(end, extended) == total(ext)
