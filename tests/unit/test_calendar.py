"""WorkCalendar: operator file, chinese_calendar, Monday-Friday fallback."""
from __future__ import annotations

import logging
from datetime import date, timedelta
from pathlib import Path

import pytest

from shared.domain import calendar as calendar_mod
from shared.domain.calendar import (
    HolidayOverrides,
    WorkCalendar,
    load_holiday_file,
    parse_holiday_overrides,
)

ROOT = Path(__file__).resolve().parents[2]
HOLIDAY_FILE = ROOT / "deploy" / "calendar" / "cn-holidays.yaml"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "needle.calendar" and r.levelno == logging.WARNING]


# -- chinese_calendar: National Day 2026 (国庆 Oct 1-7, make-up Sun Sep 20 and Sat Oct 10;
#    中秋 Fri Sep 25 - Sun Sep 27) -------------------------------------------------------

def test_national_day_2026_holidays_are_not_workdays() -> None:
    cal = WorkCalendar()
    for day in range(1, 8):
        assert not cal.is_workday(date(2026, 10, day)), f"2026-10-0{day} is a National Day holiday"
    assert cal.is_workday(date(2026, 9, 30))  # Wed, the last workday before the holiday
    assert cal.is_workday(date(2026, 10, 8))  # Thu, back to work


def test_make_up_weekend_days_are_workdays() -> None:
    cal = WorkCalendar()
    assert cal.is_workday(date(2026, 9, 20))  # Sunday, 调休 for National Day
    assert cal.is_workday(date(2026, 10, 10))  # Saturday, 调休 for National Day
    assert not cal.is_workday(date(2026, 10, 11))  # an ordinary Sunday


def test_mid_autumn_2026_friday_is_a_holiday() -> None:
    cal = WorkCalendar()
    assert not cal.is_workday(date(2026, 9, 25))


def test_weekdays_kind_ignores_holidays_and_make_up_days() -> None:
    cal = WorkCalendar("weekdays", load_holiday_file(HOLIDAY_FILE))
    assert cal.is_workday(date(2026, 10, 1))  # Thursday
    assert not cal.is_workday(date(2026, 10, 10))  # Saturday
    assert cal.is_workday(date(2027, 10, 4))  # Monday, a holiday in the file


def test_natural_kind_counts_every_day() -> None:
    cal = WorkCalendar("natural")
    start = date(2026, 9, 28)
    assert all(cal.is_workday(start + timedelta(days=i)) for i in range(14))


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown calendar kind"):
        WorkCalendar("lunar")


# -- the operator file --------------------------------------------------------------------

def test_shipped_2027_file_is_an_estimate_and_is_used(caplog: pytest.LogCaptureFixture) -> None:
    overrides = load_holiday_file(HOLIDAY_FILE)
    assert overrides.covers(2027)
    assert overrides.years[2027].estimated
    assert any("estimate" in r.getMessage() for r in _warnings(caplog))
    caplog.clear()
    cal = WorkCalendar(overrides=overrides)
    assert not cal.is_workday(date(2027, 1, 1))  # 元旦, Friday
    assert not cal.is_workday(date(2027, 2, 8))  # 春节, Monday
    assert cal.is_workday(date(2027, 2, 20))  # make-up Saturday
    assert not cal.is_workday(date(2027, 4, 5))  # 清明, Monday
    assert not cal.is_workday(date(2027, 5, 4))  # 劳动节, Tuesday
    assert not cal.is_workday(date(2027, 10, 4))  # 国庆, Monday
    assert cal.is_workday(date(2027, 10, 9))  # make-up Saturday
    assert cal.is_workday(date(2027, 10, 8))  # an ordinary Friday
    assert not cal.is_workday(date(2027, 10, 10))  # an ordinary Sunday
    assert _warnings(caplog) == []  # 2027 is known: no fallback warning


def test_operator_file_wins_over_chinese_calendar() -> None:
    overrides = parse_holiday_overrides(
        {"years": {2026: {"source": "erratum", "holidays": ["2026-03-02"], "workdays": ["2026-03-07"]}}}
    )
    cal = WorkCalendar(overrides=overrides)
    assert not cal.is_workday(date(2026, 3, 2))
    assert cal.is_workday(date(2026, 3, 7))
    # the file covers the whole year: chinese_calendar's National Day is not consulted
    assert cal.is_workday(date(2026, 10, 1))


def test_year_unknown_to_everyone_falls_back_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    cal = WorkCalendar(overrides=HolidayOverrides({}))
    day = date(2031, 1, 1)
    answers = [cal.is_workday(day + timedelta(days=i)) for i in range(60)]
    assert answers == [(day + timedelta(days=i)).weekday() < 5 for i in range(60)]
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "2031" in warnings[0].getMessage()


def test_one_warning_per_unknown_year(caplog: pytest.LogCaptureFixture) -> None:
    cal = WorkCalendar()
    for year in (2031, 2032, 2031, 2032):
        cal.is_workday(date(year, 6, 2))
        cal.is_workday(date(year, 6, 3))
    messages = [r.getMessage() for r in _warnings(caplog)]
    assert len(messages) == 2
    assert "2031" in messages[0] and "2032" in messages[1]


def test_answers_are_cached_per_day(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[date] = []
    real = calendar_mod.chinese_calendar.is_workday

    def counting(d: date) -> bool:
        calls.append(d)
        return bool(real(d))

    monkeypatch.setattr(calendar_mod.chinese_calendar, "is_workday", counting)
    cal = WorkCalendar()
    for _ in range(5):
        assert not cal.is_workday(date(2026, 10, 1))
    assert calls == [date(2026, 10, 1)]


# -- validation ----------------------------------------------------------------------------

def test_quoted_and_unquoted_days_both_load(tmp_path: Path) -> None:
    path = tmp_path / "h.yaml"
    path.write_text('years:\n  2027:\n    source: "国办发明电〔2026〕1号"\n'
                    '    holidays: [2027-01-01, "2027-01-02"]\n', encoding="utf-8")
    overrides = load_holiday_file(path)
    assert overrides.years[2027].holidays == {date(2027, 1, 1), date(2027, 1, 2)}
    assert overrides.years[2027].workdays == frozenset()
    assert not overrides.years[2027].estimated


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('years:\n  2027:\n    source: x\n    holidays: ["2027-13-01"]\n', "years.2027.holidays[0]"),
        ('years:\n  2027:\n    source: x\n    holidays: ["2027-01-01", "soon"]\n', "'soon'"),
        ('years:\n  2027:\n    source: x\n    workdays: ["2026-02-20"]\n', "not in year 2027"),
        ('years:\n  2027:\n    source: x\n    holidays: ["2027-02-20"]\n    workdays: ["2027-02-20"]\n',
         "both as a holiday and as a workday"),
        ('years:\n  2027:\n    holidays: ["2027-01-01"]\n', "years.2027.source"),
        ('years:\n  2027:\n    source: x\n    holiday: ["2027-01-01"]\n', "unknown key"),
        ('years:\n  2027:\n    source: x\n    holidays: "2027-01-01"\n', "expected a list"),
        ('years:\n  next:\n    source: x\n', "years.next"),
        ("holidays: []\n", "single key 'years'"),
        ("years: [2027\n", "not valid YAML"),
    ],
)
def test_bad_files_name_the_file_and_the_entry(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "bad-holidays.yaml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_holiday_file(path)
    assert "bad-holidays.yaml" in str(info.value)
    assert needle in str(info.value)
