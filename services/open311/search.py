"""GET requests.[format]: the filters of GeoReport v2 and the read-model query behind them.

* ``service_request_id`` (comma list, at most MAX_IDS): those requests, folded from the event store; every
  other filter is then ignored (as the spec says).
* ``service_code`` (comma list), ``status`` (open | closed, comma list), ``start_date`` / ``end_date``
  (ISO 8601; a time without an offset is in the jurisdiction's time zone) on ``requested_datetime``.
  Without dates: the last 90 days. With one date: 90 days from / up to it. A window over 90 days is a 400.
  At most MAX_RESULTS requests, newest first.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import asyncpg

from .formats import Open311Error

WINDOW = timedelta(days=90)
MAX_RESULTS = 1000
MAX_IDS = 100
STATUSES = ("open", "closed")
LIST_SQL = ("SELECT i.id, i.grid, i.category, i.title, i.urgency, i.status, i.reported_at, i.closed_at, "
            "i.lead_department, i.level, i.updated_at, i.description_public, t.resolve_due "
            "FROM issues i LEFT JOIN tasks t ON t.id = i.lead_task")


@dataclass(frozen=True, slots=True)
class Filters:
    since: datetime
    until: datetime | None
    service_codes: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()


def comma_list(raw: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in (raw or "").split(",") if v.strip()))


def parse_datetime(name: str, raw: str, tz: tzinfo) -> datetime:
    text = raw.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise Open311Error(400, f"{name} must be an ISO 8601 date-time such as 2025-03-04T10:00:00+08:00, "
                                f"not {raw!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=tz)


def filters(*, start: str | None, end: str | None, service_code: str | None, status: str | None, tz: tzinfo,
            now: datetime) -> Filters:
    since = parse_datetime("start_date", start, tz) if start else None
    until = parse_datetime("end_date", end, tz) if end else None
    if since is not None and until is not None:
        if until <= since:
            raise Open311Error(400, "end_date must be after start_date")
        if until - since > WINDOW:
            raise Open311Error(400, "start_date and end_date may not span more than 90 days")
    try:  # near year 1 or 9999 the window (or UTC, which Postgres is sent) leaves datetime's range: 400, not 5xx
        if since is not None and until is None:
            until = since + WINDOW
        elif since is None:
            since = until - WINDOW if until is not None else now - WINDOW
        since, until = since.astimezone(UTC), until.astimezone(UTC) if until is not None else None
    except OverflowError:
        raise Open311Error(400, "start_date or end_date is out of range") from None
    if "\x00" in (service_code or ""):  # Postgres text cannot hold NUL (was a 503 from the query)
        raise Open311Error(400, "service_code must not contain NUL characters")
    statuses = comma_list(status)
    for s in statuses:
        if s not in STATUSES:
            raise Open311Error(400, f"status must be open, closed or both (comma separated), not {s!r}")
    return Filters(since=since, until=until, service_codes=comma_list(service_code), statuses=statuses)


async def list_requests(pool: asyncpg.Pool, f: Filters, limit: int = MAX_RESULTS) -> list[dict[str, Any]]:
    where: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    where.append(f"i.reported_at >= {arg(f.since)}")
    if f.until is not None:
        where.append(f"i.reported_at < {arg(f.until)}")
    if f.service_codes:
        where.append(f"i.category = ANY({arg(list(f.service_codes))}::text[])")
    if set(f.statuses) == {"closed"}:
        where.append("i.status = 'closed'")
    elif set(f.statuses) == {"open"}:
        where.append("i.status <> 'closed'")
    sql = f"{LIST_SQL} WHERE {' AND '.join(where)} ORDER BY i.reported_at DESC, i.id DESC LIMIT {arg(limit)}"
    return [dict(r) for r in await pool.fetch(sql, *args)]
