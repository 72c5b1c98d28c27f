"""The monthly 通报: the period, the rules version, the rankings (departments; areas one and two levels down)
and the worst overdue cases, as CSV, XLSX (openpyxl) and a printable HTML page. ``needle report monthly`` writes
them to a directory; ``GET /v1/reports/monthly`` serves them to supervisors in scope (the dashboard links it).

Every text cell of the CSV and the XLSX is neutralised against formula injection: a cell starting with
= + - @ TAB or CR gets a leading ' (a title typed by anyone must never run in a spreadsheet)."""
from __future__ import annotations

import csv
import html
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from shared.config import OrgTree, Rulebook
from shared.domain import scoring

from .scores import compute

RATE_NAMES = {"response_rate": "响应率", "resolution_rate": "解决率", "satisfaction_rate": "满意率",
              "on_time_close_rate": "按期率"}
ITEM_NAMES = {"overdue": "超期", "rework": "返工", "rejected_return": "退单驳回", "urge": "催办", "supervision": "督办"}
LEVEL_NAMES = {"city": "市", "district": "区县", "street": "街道", "community": "社区", "grid": "网格"}
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutral(value: Any) -> Any:
    """A cell as a spreadsheet may show it: text starting like a formula gets a leading '."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


async def worst_overdue(pool: asyncpg.Pool, area: str, period: scoring.Period, now: datetime, limit: int = 10
                        ) -> list[dict[str, Any]]:
    """The lead tasks under ``area`` dispatched in the period that broke a clock, latest first by how late."""
    rows = await pool.fetch(
        "SELECT t.id, t.issue_id, t.department, t.title, t.category, t.grid, t.breached, t.acknowledge_due, "
        "t.resolve_due, t.acknowledged_at, t.resolved_at, t.status FROM tasks t JOIN issues i ON i.id = t.issue_id "
        "WHERE i.areas @> ARRAY[$1]::text[] AND t.role = 'lead' AND t.breached <> '' "
        "AND t.dispatched_at >= $2 AND t.dispatched_at < $3", area, period.start, period.end)
    out = []
    for r in rows:
        clock = "resolve" if "resolve" in r["breached"] else "acknowledge"
        due = r["resolve_due"] if clock == "resolve" else r["acknowledge_due"]
        done = r["resolved_at"] if clock == "resolve" else r["acknowledged_at"]
        late = ((done or min(now, period.end)) - due).total_seconds()
        out.append({"issue": r["issue_id"], "task": r["id"], "department": r["department"], "title": r["title"],
                    "category": r["category"], "grid": r["grid"], "clock": clock, "due": due,
                    "hours_late": round(max(late, 0) / 3600, 1), "status": r["status"]})
    out.sort(key=lambda x: (-x["hours_late"], x["task"]))
    return out[:limit]


async def build(pool: asyncpg.Pool, org: OrgTree, history: list[tuple[datetime, Rulebook]], *, area: str,
                period: str, now: datetime | None = None) -> dict[str, Any]:
    """Everything the 通报 holds."""
    now = now or datetime.now(UTC)
    depts = await compute(pool, org, history, area=area, period=period, by="department")
    tz = history[-1][1].tz
    p = scoring.month(period, tz)
    areas: list[dict[str, Any]] = []
    level_rank = [lv.value for lv in sorted({a.level for a in org.areas.values()}, key=lambda lv: -lv.rank)]
    own = org.area(area).level.value
    below = level_rank[level_rank.index(own) + 1:level_rank.index(own) + 3] if own in level_rank else []
    for lv in below:
        if lv == "grid":
            continue
        body = await compute(pool, org, history, area=area, period=period, by="area", level=lv)
        if body["items"]:
            areas.append({"level": lv, "name": LEVEL_NAMES.get(lv, lv), "items": body["items"]})
    return {"title": f"{org.area(area).name} {period} 考核通报", "period": period, "area": area,
            "area_name": org.area(area).name, "from": p.first_day.isoformat(), "to": p.last_day.isoformat(),
            "rules_version": depts["rules_version"], "rules": depts["rules"], "generated_at": now,
            "departments": depts["items"], "areas": areas,
            "overdue": await worst_overdue(pool, area, p, now)}


# -- the tables, once for every format ---------------------------------------------------------------------------
def _ranking_header(rules: dict[str, Any]) -> list[str]:
    return (["名次 rank", "单位 unit", "编号 id", "得分 score"]
            + [f"{RATE_NAMES.get(r, r)} {r}" for r in rules["weights"]]
            + [f"{ITEM_NAMES.get(i, i)}扣分 {i}" for i in rules["deductions"]] + ["扣分合计 deducted"])


def _ranking_row(row: dict[str, Any], rules: dict[str, Any]) -> list[Any]:
    rates = [row["rates"][r]["value"] for r in rules["weights"]]
    items = [f'{row["deductions"][i]["count"]} → {row["deductions"][i]["deducted"]:g}' for i in rules["deductions"]]
    return [row["rank"] if row["rank"] is not None else "—", row["name"], row["id"],
            row["score"] if row["score"] is not None else "无业务", *rates, *items, row["deducted"]]


OVERDUE_HEADER = ["案件 issue", "任务 task", "责任单位 department", "标题 title", "类别 category", "网格 grid",
                  "时限 clock", "超期小时 hours late", "状态 status"]


def _overdue_row(o: dict[str, Any]) -> list[Any]:
    return [o["issue"], o["task"], o["department"], o["title"], o["category"], o["grid"], o["clock"],
            o["hours_late"], o["status"]]


def tables(rep: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(sheet name, header, rows) of the 通报, in order."""
    rules = rep["rules"]
    out = [("部门排名 Departments", _ranking_header(rules), [_ranking_row(r, rules) for r in rep["departments"]])]
    for a in rep["areas"]:
        out.append((f'{a["name"]}排名 {a["level"].title()}', _ranking_header(rules),
                    [_ranking_row(r, rules) for r in a["items"]]))
    out.append(("超期案件 Overdue", OVERDUE_HEADER, [_overdue_row(o) for o in rep["overdue"]]))
    return out


def summary_rows(rep: dict[str, Any]) -> list[list[Any]]:
    rules = rep["rules"]
    return [["通报 report", rep["title"]], ["区域 area", f'{rep["area_name"]} ({rep["area"]})'],
            ["期间 period", f'{rep["period"]} ({rep["from"]} – {rep["to"]})'],
            ["规则版本 rules version", rep["rules_version"]],
            ["权重 weights", ", ".join(f"{RATE_NAMES.get(k, k)} {v:g}" for k, v in rules["weights"].items())],
            ["扣分 deductions", ", ".join(f"{ITEM_NAMES.get(k, k)} {v:g}" for k, v in rules["deductions"].items())],
            ["上限 caps", ", ".join(f"{ITEM_NAMES.get(k, k)} {v:g}" for k, v in rules["caps"].items())],
            ["生成时间 generated", rep["generated_at"].isoformat(timespec="seconds").replace("+00:00", "Z")]]


def to_csv(rep: dict[str, Any]) -> str:
    """One CSV: the summary, then each table under a line naming it."""
    buf = io.StringIO()
    w = csv.writer(buf)
    for row in summary_rows(rep):
        w.writerow([neutral(c) for c in row])
    for name, header, rows in tables(rep):
        w.writerow([])
        w.writerow([name])
        w.writerow(header)
        for row in rows:
            w.writerow([neutral(c) for c in row])
    return buf.getvalue()


def to_xlsx(rep: dict[str, Any]) -> bytes:
    from openpyxl import Workbook
    from openpyxl.styles import Font

    wb = Workbook()
    ws = wb.active
    assert ws is not None
    ws.title = "概览 Summary"
    for row in summary_rows(rep):
        ws.append([neutral(c) for c in row])
    ws.column_dimensions["A"].width, ws.column_dimensions["B"].width = 22, 60
    for name, header, rows in tables(rep):
        sheet = wb.create_sheet(name[:31])
        sheet.append(header)
        for cell in sheet[1]:
            cell.font = Font(bold=True)
        for row in rows:
            sheet.append([neutral(c) for c in row])
        sheet.freeze_panes = "A2"
    out = io.BytesIO()
    wb.save(out)
    return out.getvalue()


CSS = """
body { font-family: "Noto Serif CJK SC", "Songti SC", serif; margin: 2rem; color: #111; }
h1 { text-align: center; font-size: 1.6rem; margin-bottom: .2rem; }
.meta { text-align: center; color: #444; margin-bottom: 1.5rem; }
h2 { font-size: 1.1rem; border-left: 4px solid #b22; padding-left: .5rem; margin-top: 1.6rem; }
table { border-collapse: collapse; width: 100%; font-size: .85rem; }
th, td { border: 1px solid #999; padding: .25rem .4rem; text-align: center; }
th { background: #eee; }
td.name { text-align: left; white-space: nowrap; }
.rules { font-size: .85rem; color: #333; }
@media print { body { margin: 0; } h2 { break-after: avoid; } tr { break-inside: avoid; } }
"""


def to_html(rep: dict[str, Any]) -> str:
    e = html.escape

    def table(header: list[str], rows: list[list[Any]]) -> str:
        head = "".join(f"<th>{e(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(
            f'<td{" class=name" if i in (1, 3) else ""}>{e("" if c is None else str(c))}</td>'
            for i, c in enumerate(r)) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body or ''}</tbody></table>"

    parts = [f"<!doctype html><html lang=zh-CN><head><meta charset=utf-8><title>{e(rep['title'])}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{e(rep['title'])}</h1>",
             f"<p class=meta>{e(rep['from'])} 至 {e(rep['to'])} · 规则版本 {e(rep['rules_version'])}</p>",
             "<p class=rules>" + "<br>".join(f"{e(str(k))}：{e(str(v))}" for k, v in summary_rows(rep)[4:7]) + "</p>"]
    for name, header, rows in tables(rep):
        parts.append(f"<h2>{e(name)}</h2>")
        parts.append(table(header, rows) if rows else "<p>无 none</p>")
    parts.append("</body></html>")
    return "".join(parts)


def write(rep: dict[str, Any], out: Path) -> list[Path]:
    """The 通报 as tongbao-<area>-<period>.{csv,xlsx,html} in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"tongbao-{rep['area']}-{rep['period']}"
    files = [stem.with_suffix(".csv"), stem.with_suffix(".xlsx"), stem.with_suffix(".html")]
    files[0].write_text(to_csv(rep), "utf-8-sig")  # a BOM: spreadsheet programs then read the Chinese right
    files[1].write_bytes(to_xlsx(rep))
    files[2].write_text(to_html(rep), "utf-8")
    return files
