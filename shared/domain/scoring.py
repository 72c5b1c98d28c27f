"""考核: monthly scores and rankings from per-period counts. Pure: no IO, time as arguments.

A unit (a department, or an area: a street, a community) is scored over a period (a calendar month in the
rulebook's timezone) from the counters the read models keep per day (``stats_daily``), summed over the month:

    score = sum over weighted rates of weight x rate      (a rate with denominator 0 earns its full weight)
          - min(sum over items of min(count x deduction, cap of the item), cap "total")
    never below 0, rounded to 2 decimals. A unit with nothing to judge in the period (no weighted rate with a
    denominator, no deduction) is listed unranked (score None): no work is not a perfect score.

Items counted against a unit: ``overdue`` (SLA breaches of its tasks), ``rework`` (返工: reopens of issues it
led), ``rejected_return`` (退单驳回: its returns refused on review), ``urge`` (催办 of issues it held) and
``supervision`` (督办: its tasks put under supervision). Which counter feeds each item is :data:`ITEM_COUNTERS`.

The rules are the ``scoring:`` section of the rulebook in force in the month (:func:`rules_in_force`): the
newest rulebook published before the month ended (a month before any rulebook: the first one)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, tzinfo
from typing import Any

from shared.config.rulebook import Rulebook, Scoring

# rate -> (numerator counter, denominator counter), per kind of unit (DOMAIN.md; a department's 解决率 is
# over its tasks, its 满意率 over the feedback on issues it led)
AREA_RATES: dict[str, tuple[str, str]] = {  # the fair rates of /v1/stats: a clock judged once, when it is due
    "response_rate": ("tasks_ack_on_time", "tasks_ack_due"),
    "resolution_rate": ("issues_resolved", "issues_dispatched"),
    "satisfaction_rate": ("feedback_satisfied", "feedback"),
    "on_time_close_rate": ("closed_on_time", "closed"),
}
DEPT_RATES: dict[str, tuple[str, str]] = {
    "response_rate": ("tasks_ack_on_time", "tasks_ack_due"),
    "resolution_rate": ("tasks_resolved", "tasks_resolve_due"),
    "satisfaction_rate": ("feedback_satisfied", "feedback"),
    "on_time_close_rate": ("tasks_resolved_on_time", "tasks_resolved"),
}
ITEM_COUNTERS: dict[str, str] = {
    "overdue": "sla_breached",
    "rework": "reopened",
    "rejected_return": "returns_rejected",
    "urge": "urged",
    "supervision": "supervised",
}


@dataclass(frozen=True, slots=True)
class Period:
    """A calendar month in a timezone: [start, end)."""

    name: str  # "2026-11"
    start: datetime
    end: datetime

    @property
    def first_day(self) -> date:
        return self.start.date()

    @property
    def last_day(self) -> date:
        return date.fromordinal(self.end.date().toordinal() - 1)


def month(name: str, tz: tzinfo) -> Period:
    """``YYYY-MM`` as a Period; ValueError for anything else."""
    if len(name) != 7 or name[4] != "-" or not (name[:4].isdigit() and name[5:].isdigit()):
        raise ValueError(f"expected a month as YYYY-MM, got {name!r}")
    y, m = int(name[:4]), int(name[5:])
    if not (1 <= y <= 9998 and 1 <= m <= 12):
        raise ValueError(f"expected a month as YYYY-MM, got {name!r}")
    nxt = (y + 1, 1) if m == 12 else (y, m + 1)
    return Period(name, datetime.combine(date(y, m, 1), time(), tz), datetime.combine(date(*nxt, 1), time(), tz))


def previous_months(period: Period, n: int, tz: tzinfo) -> list[Period]:
    """The ``n`` months ending with ``period``, oldest first."""
    y, m = int(period.name[:4]), int(period.name[5:])
    out = []
    for _ in range(n):
        out.append(month(f"{y:04d}-{m:02d}", tz))
        y, m = (y - 1, 12) if m == 1 else (y, m - 1)
        if y < 1:
            break
    return out[::-1]


def rules_in_force(history: Sequence[tuple[datetime, Rulebook]], period: Period) -> Rulebook:
    """The rulebook a month is scored by: the newest published before the month ended; a month before the
    first rulebook is scored by the first. ``history``: (published at, rulebook), in stream order."""
    if not history:
        raise ValueError("no rulebook was ever published")
    chosen = history[0][1]
    for at, rb in history:
        if at < period.end:
            chosen = rb
    return chosen


def _rate(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


def score(counts: Mapping[str, int], rules: Scoring, rates: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """One unit's score and every number behind it."""
    weights = dict(rules.weights)
    full = sum(weights.values())
    rate_rows: dict[str, dict[str, Any]] = {}
    earned = 0.0
    for name, w in weights.items():
        num, den = rates[name]
        n, d = int(counts.get(num, 0)), int(counts.get(den, 0))
        value = _rate(n, d)
        points = w * (n / d if d else 1.0)
        earned += points
        rate_rows[name] = {"value": value, "numerator": n, "denominator": d, "weight": w,
                           "points": round(points, 4)}
    items: dict[str, dict[str, Any]] = {}
    deducted = 0.0
    for item, per in rules.deductions:
        count = int(counts.get(ITEM_COUNTERS[item], 0))
        raw = count * per
        cap = rules.cap(item)
        charged = min(raw, cap) if cap is not None else raw
        deducted += charged
        items[item] = {"count": count, "per_item": per, "cap": cap, "deducted": round(charged, 4)}
    total_cap = rules.cap("total")
    if total_cap is not None:
        deducted = min(deducted, total_cap)
    return {"score": round(max(earned - deducted, 0.0), 2), "full_marks": round(full, 4),
            "earned": round(earned, 4), "deducted": round(deducted, 4), "rates": rate_rows, "deductions": items}


def rank(scored: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Units best first (ties share a rank, ``1, 1, 3``; then by id for a stable order). A unit with nothing
    counted in the period (``score`` None) is listed last, unranked."""
    order = sorted(scored.items(), key=lambda kv: (kv[1]["score"] is None, -(kv[1]["score"] or 0), kv[0]))
    out: list[dict[str, Any]] = []
    for i, (unit, body) in enumerate(order):
        if body["score"] is None:
            r = None
        else:
            r = out[-1]["rank"] if out and out[-1]["score"] == body["score"] else i + 1
        out.append({"id": unit, "rank": r, **body})
    return out


def scores(counts: Mapping[str, Mapping[str, int]], rules: Scoring, by: str) -> list[dict[str, Any]]:
    """Rank every unit of ``counts`` (unit id -> summed counters); ``by``: "department" or "area"."""
    table = DEPT_RATES if by == "department" else AREA_RATES
    out = {}
    for unit, c in counts.items():
        body = score(c, rules, table)
        if all(r["denominator"] == 0 for r in body["rates"].values()) and not body["deducted"]:
            body["score"] = None  # nothing to judge in the month (no clock due, no deduction): not a perfect score
        out[unit] = body
    return rank(out)


def sum_days(rows: Sequence[tuple[date, str, str, int]], period: Period) -> dict[str, dict[str, int]]:
    """Day buckets (day, unit, counter, n) summed over the period's days: unit -> counter -> n."""
    out: dict[str, dict[str, int]] = {}
    for day, unit, metric, n in rows:
        if period.first_day <= day <= period.last_day:
            c = out.setdefault(unit, {})
            c[metric] = c.get(metric, 0) + int(n)
    return out
