"""The monthly 通报 (services/projections/report.py): given a report built from scored counts, the XLSX opens
with openpyxl and has the expected sheets, the CSV neutralises formula-like cells, and the HTML page names the
period, the rules version and every table."""
from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

from openpyxl import load_workbook

from services.projections import report
from services.projections.scores import rules_summary
from shared.config import parse_rulebook
from shared.domain import scoring
from tests.unit.test_scoring import NOV, RULES, history

EVIL = "=HYPERLINK(\"http://x\",\"click\")"


def a_report() -> dict:
    rb = parse_rulebook(RULES + "version: r-2026-11\n")
    depts = scoring.scores(scoring.sum_days(history().days("dept"), NOV), rb.scoring, "department")
    areas = scoring.scores({k: v for k, v in scoring.sum_days(history().days("area"), NOV).items()
                            if k in ("wuxing",)}, rb.scoring, "area")
    for r in depts:
        r["name"] = {"dinghai-roads": "定海区交通运输局"}.get(r["id"], EVIL)
    for r in areas:
        r["name"] = "五星社区"
    return {"title": "定海区 2026-11 考核通报", "period": "2026-11", "area": "dinghai", "area_name": "定海区",
            "from": "2026-11-01", "to": "2026-11-30", "rules_version": rb.version, "rules": rules_summary(rb),
            "generated_at": datetime(2026, 12, 1, tzinfo=UTC), "departments": depts,
            "areas": [{"level": "community", "name": "社区", "items": areas}],
            "overdue": [{"issue": "A", "task": "A-3", "department": "dinghai-roads", "title": "+cmd|' /C calc'!A0",
                         "category": "road_damage", "grid": "wuxing-g1", "clock": "acknowledge", "due": None,
                         "hours_late": 0.5, "status": "resolved"}]}


def test_the_xlsx_opens_with_the_library_and_has_the_expected_sheets() -> None:
    wb = load_workbook(io.BytesIO(report.to_xlsx(a_report())))
    assert wb.sheetnames == ["概览 Summary", "部门排名 Departments", "社区排名 Community", "超期案件 Overdue"]
    summary = {r[0]: r[1] for r in wb["概览 Summary"].iter_rows(values_only=True)}
    assert summary["规则版本 rules version"] == "r-2026-11" and summary["期间 period"].startswith("2026-11")
    rows = list(wb["部门排名 Departments"].iter_rows(values_only=True))
    assert rows[0][:4] == ("名次 rank", "单位 unit", "编号 id", "得分 score")
    assert [(r[0], r[2], r[3]) for r in rows[1:]] == [(1, "dinghai-police", 68), (2, "dinghai-roads", 40.33)]
    assert rows[1][1] == "'" + EVIL  # text, never a formula
    assert all(c.data_type != "f" for row in wb["部门排名 Departments"].iter_rows() for c in row)
    overdue = list(wb["超期案件 Overdue"].iter_rows(values_only=True))
    assert overdue[1][3] == "'+cmd|' /C calc'!A0"


def test_csv_cells_are_neutralised_against_formula_injection() -> None:
    text = report.to_csv(a_report())
    cells = [c for row in csv.reader(io.StringIO(text)) for c in row]
    assert "'" + EVIL in cells and EVIL not in cells
    assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r") or (c[:1] == "-" and c != "-")]
    for raw, want in (("=1+1", "'=1+1"), ("+1", "'+1"), ("-1", "'-1"), ("@SUM(A1)", "'@SUM(A1)"),
                      ("\tx", "'\tx"), ("\rx", "'\rx"), ("ok", "ok"), (3, 3)):
        assert report.neutral(raw) == want


def test_the_html_page_names_the_period_the_rules_version_and_every_table() -> None:
    page = report.to_html(a_report())
    for needle in ("定海区 2026-11 考核通报", "r-2026-11", "部门排名", "社区排名", "超期案件", "定海区交通运输局",
                   "2026-11-01"):
        assert needle in page
    assert "<script" not in page and "&lt;" not in "".join(page.split("HYPERLINK")[0:1])
