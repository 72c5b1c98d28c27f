"""The rulebook checked against the org: kinds are open, so what a rulebook names is checked here, not against a
list. Pure: no IO.

* **error**: a kind the rulebook names (a lead, a co-handler, or ``fallback``) that no department of the org
  has. The finding names the rulebook file, the line, the path (``categories.garbage_overflow.handlers.street
  .lead``) and the nearest kind the org has ("did you mean").
* **warning**: a kind that some owner areas cannot reach (no department of that kind at the area or above):
  those areas are listed; for a lead they fall back to the command centre (兜底), for a co-handler no co-task is
  dispatched (the router records the gap in the ``issue_routed`` event).
* **coverage**: per category × level (every level with a handler entry, and the start level), how many of the
  org's areas at that level (the owner areas) resolve the lead and each co kind, and which fall back to 兜底.

A department serves its area and everything under it, so "resolves" means: a department of that kind is attached
to the owner area or to one of its ancestors (``OrgTree.serving``, the same walk as routing).

``needle rules check FILE --org ORG`` prints :func:`render_report`; ``needle up`` and ``needle rules publish``
call :func:`check_against_org`, which raises :class:`ConfigError` on the first error.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.config.loader import ConfigError
from shared.config.org import OrgTree
from shared.config.rulebook import Rulebook
from shared.domain.levels import LEVEL_ORDER, Level


@dataclass(frozen=True)
class Finding:
    severity: Literal["error", "warning"]
    problem: str
    file: str
    line: int | None
    path: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.problem}" if self.path else f"{where}: {self.problem}"


@dataclass(frozen=True)
class KindCoverage:
    """One kind at one (category, level): the owner areas it resolves for, and the ones it does not."""

    kind: str
    role: Literal["lead", "co"]
    served: int
    unserved: tuple[str, ...]


@dataclass(frozen=True)
class CoverageRow:
    category: str
    level: Level
    areas: int
    """How many areas of the org are at ``level`` (the owner areas of this row)."""
    handled: bool
    """False when the category has no handler entry at this level: every owner area goes to 兜底."""
    kinds: tuple[KindCoverage, ...] = ()

    @property
    def lead(self) -> KindCoverage | None:
        return next((k for k in self.kinds if k.role == "lead"), None)

    @property
    def fallback_areas(self) -> tuple[str, ...]:
        """Owner areas whose lead goes to the fallback (兜底)."""
        lead = self.lead
        if not self.handled:
            return ("*",) if self.areas else ()
        return lead.unserved if lead is not None else ()


@dataclass(frozen=True)
class Report:
    source: str
    errors: tuple[Finding, ...] = ()
    warnings: tuple[Finding, ...] = ()
    coverage: tuple[CoverageRow, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        return not self.errors


def _named_kinds(rulebook: Rulebook) -> Iterator[tuple[str, str, Level | None, str, Literal["lead", "co"]]]:
    """(path, category, level, kind, role) for every kind the rulebook names in its handlers."""
    for cid, cat in rulebook.categories.items():
        for level, handler in cat.handlers.items():
            base = f"categories.{cid}.handlers.{level}"
            yield f"{base}.lead", cid, level, handler.lead, "lead"
            for i, kind in enumerate(handler.co):
                yield f"{base}.co[{i}]", cid, level, kind, "co"


def _did_you_mean(kind: str, known: frozenset[str]) -> str:
    close = difflib.get_close_matches(kind, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _areas_at(org: OrgTree, level: Level) -> list[str]:
    return [a.id for a in org.areas.values() if a.level == level]


def _unreached(org: OrgTree, areas: list[str], kind: str) -> tuple[str, ...]:
    return tuple(a for a in areas if org.serving(a, kind) is None)


def _listing(areas: tuple[str, ...], most: int = 8) -> str:
    shown = ", ".join(areas[:most])
    return shown + (f" and {len(areas) - most} more" if len(areas) > most else "")


def cross_check(rulebook: Rulebook, org: OrgTree, source: str | None = None) -> Report:
    """Check ``rulebook`` against ``org``: errors, warnings and the coverage table (see the module docstring).
    ``source`` names the rulebook file in findings (default: the file it was parsed from)."""
    file = source or rulebook.source or "<rulebook>"
    known = org.kinds
    errors: list[Finding] = []
    warnings: list[Finding] = []
    by_level = {lv: _areas_at(org, lv) for lv in LEVEL_ORDER}

    def finding(severity: Literal["error", "warning"], path: str, problem: str) -> Finding:
        return Finding(severity, problem, file, rulebook.line(path), path)

    if rulebook.fallback not in known:
        errors.append(finding("error", "fallback", f"fallback kind '{rulebook.fallback}' (兜底): no department of "
                              f"the org has it{_did_you_mean(rulebook.fallback, known)}"))
    else:
        missing = _unreached(org, list(org.areas), rulebook.fallback)
        if missing:
            warnings.append(finding("warning", "fallback", f"fallback kind '{rulebook.fallback}' (兜底) serves no "
                                    f"department for {len(missing)} area(s): {_listing(missing)}; an issue owned "
                                    "there that nobody else takes cannot be routed"))
    for path, _cid, level, kind, role in _named_kinds(rulebook):
        if kind not in known:
            errors.append(finding("error", path, f"unknown department kind '{kind}': no department of the org has "
                                  f"it{_did_you_mean(kind, known)}"))
            continue
        assert level is not None
        missing = _unreached(org, by_level[level], kind)
        if missing:
            then = f"their lead goes to {rulebook.fallback}, 兜底" if role == "lead" else "no co-task for them"
            warnings.append(finding("warning", path, f"'{kind}' serves {len(by_level[level]) - len(missing)} of "
                                    f"{len(by_level[level])} {level} areas; none at or above "
                                    f"{_listing(missing)} ({then})"))

    rows: list[CoverageRow] = []
    for cid, cat in rulebook.categories.items():
        levels = sorted({*cat.handlers, cat.start}, key=lambda lv: lv.rank)
        for level in levels:
            areas = by_level[level]
            handler = cat.handlers.get(level)
            if handler is None:
                rows.append(CoverageRow(cid, level, len(areas), handled=False))
                continue
            named: list[tuple[str, Literal["lead", "co"]]] = [(handler.lead, "lead"), *((k, "co") for k in handler.co)]
            kinds = [KindCoverage(kind, role, len(areas) - len(miss), miss)
                     for kind, role in named for miss in [_unreached(org, areas, kind)]]
            rows.append(CoverageRow(cid, level, len(areas), handled=True, kinds=tuple(kinds)))
    return Report(file, tuple(errors), tuple(warnings), tuple(rows))


def check_against_org(rulebook: Rulebook, org: OrgTree, source: str | None = None) -> list[Finding]:
    """The warnings of :func:`cross_check`; raises :class:`ConfigError` (the first error, with a count of the
    others) when the rulebook names a kind the org lacks. For ``needle up`` and ``needle rules publish``."""
    report = cross_check(rulebook, org, source)
    if report.errors:
        first = report.errors[0]
        more = len(report.errors) - 1
        problem = first.problem + (f" (and {more} more: `needle rules check FILE --org ORG` lists them)"
                                   if more else "")
        raise ConfigError(problem, file=first.file, line=first.line, path=first.path)
    return list(report.warnings)


def configuration_gaps(rulebook: Rulebook, org: OrgTree, area: str | None = None) -> list[dict[str, Any]]:
    """The kinds the rulebook names that nothing serves, per (category, level, kind), restricted to the owner
    areas under ``area`` (all when None): what the dashboard lists as configuration gaps."""
    out: list[dict[str, Any]] = []
    for row in cross_check(rulebook, org).coverage:
        for k in row.kinds:
            areas = [a for a in k.unserved if area is None or org.is_under(a, area)]
            if areas:
                out.append({"category": row.category, "level": str(row.level), "kind": k.kind,
                            "kind_name": org.kind_name(k.kind), "role": k.role, "areas": areas})
    return out


def render_report(report: Report) -> str:
    """The report as plain text: errors, warnings, then the coverage table (category × level)."""
    lines: list[str] = []
    lines += [f"error: {f}" for f in report.errors]
    lines += [f"warning: {f}" for f in report.warnings]
    table: list[tuple[str, ...]] = [("category", "level", "areas", "lead", "co", "兜底 (fallback)")]
    for row in report.coverage:
        if not row.handled:
            table.append((row.category, str(row.level), str(row.areas), "-", "-",
                           "all (no handler)" if row.areas else "-"))
            continue
        lead = row.lead
        assert lead is not None
        co = ", ".join(f"{k.kind} {k.served}/{row.areas}" for k in row.kinds if k.role == "co") or "-"
        fb = _listing(lead.unserved, 4) if lead.unserved else "-"
        table.append((row.category, str(row.level), str(row.areas), f"{lead.kind} {lead.served}/{row.areas}", co,
                      fb))
    widths = [max(_width(r[i]) for r in table) for i in range(len(table[0]))]
    if lines:
        lines.append("")
    for r in table:
        lines.append("  ".join(cell + " " * (w - _width(cell)) for cell, w in zip(r, widths, strict=True)).rstrip())
    summary = f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)"
    lines += ["", f"{report.source}: {summary}"]
    return "\n".join(lines)


def _width(text: str) -> int:
    """Display width: CJK characters take two columns."""
    return sum(2 if "\u2e80" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef" else 1 for ch in text)
