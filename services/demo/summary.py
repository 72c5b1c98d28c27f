"""The final table of a replay: one row per story issue, one for the campaign."""
from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from rich.markup import escape
from rich.table import Table

from .client import Demo
from .results import DemoResult


def seconds(issue: dict[str, Any]) -> float | None:
    """Report to close, as the stream recorded it."""
    if not issue.get("reported_at") or not issue.get("closed_at"):
        return None
    return (datetime.fromisoformat(issue["closed_at"]) - datetime.fromisoformat(issue["reported_at"])).total_seconds()


def elapsed(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}s" if value < 120 else f"{value / 60:.1f}min"


def _lead(d: Demo, issue: dict[str, Any]) -> str:
    leads = [t for t in issue.get("tasks", []) if t["role"] == "lead" and t["status"] != "returned"]
    return d.dept_name(leads[-1]["department"]) if leads else "-"


def summary_table(d: Demo, result: DemoResult) -> Table:
    table = Table(title="needle demo · 千条线穿进一根针", show_lines=False)
    for col in ("story", "where", "category", "path (levels)", "lead", "co", "status", "report→close", "回访"):
        table.add_column(col, overflow="fold")
    for story in result.stories:
        label = story.title.split(" — ")[0]
        issues = [result.issues[i] for i in story.issue_ids if i in result.issues]
        if story.error and not issues:
            table.add_row(escape(label), "-", "-", "-", "-", "-", "[red]failed[/red]", "-", "-")
            continue
        if story.campaign is not None:
            closed = sum(1 for i in issues if i["status"] == "closed")
            levels = Counter(i.get("level") or "-" for i in issues)
            kinds = Counter(d.dept_kind(t["department"]) for i in issues for t in i["tasks"] if t["role"] == "lead")
            slowest = elapsed(max((t for i in issues if (t := seconds(i)) is not None), default=None))
            colour = "green" if closed == len(issues) and issues else "red"
            table.add_row(escape(label), f"{len(issues)} grids", d.category_name(issues[0]["category"]) if issues
                          else "-", ", ".join(f"{k} ×{v}" for k, v in levels.items()),
                          ", ".join(f"{k} ×{v}" for k, v in kinds.items()), "-",
                          f"[{colour}]{closed}/{len(issues)} closed[/{colour}]", f"≤ {slowest}", "-")
            continue
        for issue in issues:
            hops = result.trails.get(issue["id"], [])
            path = " → ".join(h.level for h in hops) or (issue.get("level") or "-")
            final_level = [t for t in issue["tasks"] if t["level"] == issue.get("level")]
            co = sum(1 for t in final_level if t["role"] == "co")
            table.add_row(escape(label), escape(d.area_name(issue["grid"])), escape(d.category_name(issue["category"])),
                          path, escape(_lead(d, issue)), str(co), d.styled(issue["status"]), elapsed(seconds(issue)),
                          d.styled(issue.get("satisfaction")))
    return table
