"""The rulebook (权责清单, deploy/rules/*.yaml): category × level -> department kinds, with SLA clocks.

Contract format (DESIGN.md, "Contract: org tree and rulebook")::

    calendar: cn_workdays        # cn_workdays | weekdays | natural
    timezone: Asia/Shanghai
    working_hours: ["08:30-12:00", "13:30-17:30"]
    warn_at: 0.8                 # fraction of a clock elapsed when a warning fires
    categories:
      sea_safety:
        name: 海上安全
        group: 海洋渔业          # optional (Open311 group)
        description: ...         # optional
        start: district          # level that owns the issue when reported
        sla: {acknowledge: PT15M, resolve: PT1H, clock: natural}
        handlers:
          district: {lead: ocean_fisheries, co: [maritime_police]}
    risk:                        # flags that lift an issue at once
      collective_petition: {level: street, urgency: urgent}
    escalate:
      on: [acknowledge_breach, resolve_breach, return, verification_failed_twice]

Kinds (``lead``, ``co``) are open identifiers (``[a-z][a-z0-9_]*``); whether the org has departments of them
is checked against the org by :mod:`shared.config.crosscheck`, not here. ``fallback:`` names the kind that takes
what nobody else owns (兜底; default ``command_center``).

Intake (optional, per category): ``intake: auto`` (the default: a report is dispatched by the rules at once)
or ``intake: review`` (受理: the report waits in ``pending_review`` until the command centre or a supervisor
accepts, rejects, voids or recategorises it). ``sla: {review: PT30M}`` (optional) is the review clock: a report
still waiting that long is breached (``review_breached``), warned at ``warn_at`` of it (``review_warned``), on
the natural clock; without it a held report has no clock.

Duplicates (optional, top level or per category): ``similar: {radius_m: 200, within: P3D}`` (the default) —
open issues of the same category within that distance of a report's location, reported within that window of
it, are listed as similar (合并办理).

Evidence (optional, per category): ``evidence: {report: photo, resolve: photo}`` — a report of the category
must carry a photo (phase ``before``) and a resolve of its tasks a photo (phase ``after``); either may be absent.

Extensions (optional): ``version:`` (default: the first 12 hex digits of the sha256 of the file's bytes), and
``risk.<flag>.name`` (a display name, e.g. 集体上访苗头), and
``urgency: {emergency: {min_start: street, sla_factor: 0.25}}`` — per urgency a minimum start level and a
factor applied to both SLA durations; ``coverage: {target: 0.9, period: P30D}`` — the 入户率 a grid should reach
over the trailing period (grids below it are listed on the dashboard; these values are the defaults);
``scoring:`` — 考核 (see :class:`Scoring`): ``weights`` of the rates (full marks = their sum), ``deductions``
per counted item and ``caps`` (per item, and ``total``); a month is scored by the rulebook in force in it.
Dispatch control (issue 19), at the top level for every category and inside a category (a key there replaces
the top-level one as a whole)::

    return: {approval: command_center}     # 退单 needs the command centre's approval (default: none, at once)
    reassign: {clocks: restart}            # 改派: the new task's clocks restart (default) or continue
    extension: {max: P15D, max_count: 2}   # each 延期 at most ``max``, at most ``max_count`` approved per task
    suspension: {max: P90D, max_count: 2}  # each 缓办 at most ``max`` long, at most ``max_count`` per task
    progress_every: P7D                    # the lead reports progress (阶段性答复) this often on long clocks
    info_request: {pauses: true}           # an info request (补充材料) pauses the clock until the reply
``calendar``, ``timezone``, ``working_hours``, ``warn_at`` and ``escalate``
default to the values shown above; ``clock`` defaults to ``natural``. Durations are ISO 8601 (PnW or
PnDTnHnMnS); with ``clock: working`` a day means a working day and hours are counted inside working hours.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import time, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shared.config.loader import Document, parse_yaml, read_source, text_digest
from shared.config.org import check_kind
from shared.domain.levels import Level

CALENDARS: tuple[str, ...] = ("cn_workdays", "weekdays", "natural")
CLOCKS: tuple[str, ...] = ("natural", "working")
URGENCIES: tuple[str, ...] = ("normal", "urgent", "emergency")
"""Urgencies, lowest first (``URGENCIES.index`` orders them)."""
_TRIGGER_ORDER = ("acknowledge_breach", "resolve_breach", "return", "verification_failed_twice")
ESCALATION_TRIGGERS: frozenset[str] = frozenset(_TRIGGER_ORDER)
"""What may move an issue one level up (``escalate.on``)."""
DEFAULT_FALLBACK = "command_center"
"""The kind that takes what nobody else owns (兜底) unless the rulebook's ``fallback:`` names another."""
DEFAULT_WORKING_HOURS: tuple[tuple[time, time], ...] = ((time(8, 30), time(12, 0)), (time(13, 30), time(17, 30)))

Clock = Literal["natural", "working"]


@dataclass(frozen=True, slots=True)
class Sla:
    acknowledge: timedelta
    resolve: timedelta
    clock: Clock = "natural"
    review: timedelta | None = None  # 受理: how long a report may wait in pending_review (intake: review)

    def scaled(self, factor: float) -> Sla:
        """Both durations multiplied by ``factor`` (rounded to whole seconds)."""
        return replace(self, acknowledge=_scale(self.acknowledge, factor), resolve=_scale(self.resolve, factor))


def _scale(delta: timedelta, factor: float) -> timedelta:
    return timedelta(seconds=round(delta.total_seconds() * factor))


@dataclass(frozen=True, slots=True)
class Handler:
    """Department kinds that handle a category at one level: one lead (主办) and co-handlers (协办)."""

    lead: str
    co: tuple[str, ...] = ()


INTAKE_MODES: tuple[str, ...] = ("auto", "review")
EVIDENCE_KINDS: tuple[str, ...] = ("photo",)
EVIDENCE_STAGES: tuple[str, ...] = ("report", "resolve")


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a category's reports and resolves must carry (``None``: nothing)."""

    report: str | None = None
    resolve: str | None = None


@dataclass(frozen=True, slots=True)
class Similar:
    """合并办理: open issues of the same category within ``radius_m`` of a report's location and reported
    within ``within`` of it are listed as similar (possible duplicates)."""

    radius_m: float = 200.0
    within: timedelta = timedelta(days=3)


@dataclass(frozen=True, slots=True)
class Category:
    id: str
    name: str
    start: Level
    sla: Sla
    handlers: dict[Level, Handler] = field(default_factory=dict)
    group: str | None = None
    description: str | None = None
    evidence: Evidence = Evidence()
    intake: str = "auto"  # auto | review
    similar: Similar | None = None  # overrides the rulebook's top-level ``similar``


@dataclass(frozen=True, slots=True)
class RiskRule:
    """A risk flag lifts an issue at once to ``level`` and at least ``urgency``."""

    level: Level
    urgency: str = "normal"
    name: str | None = None
    """Display name (optional ``name:``; Open311 shows it), e.g. 集体上访苗头."""


@dataclass(frozen=True, slots=True)
class UrgencyRule:
    min_start: Level | None = None
    sla_factor: float | None = None


@dataclass(frozen=True, slots=True)
class Coverage:
    """组团式服务: the share of a grid's households its team should visit (入户率) within ``period``."""

    target: float = 0.9
    period: timedelta = timedelta(days=30)


SCORE_RATES: tuple[str, ...] = ("response_rate", "resolution_rate", "satisfaction_rate", "on_time_close_rate")
"""Rates a ``scoring.weights`` entry may weigh (DOMAIN.md's definitions)."""
DEDUCTIONS: tuple[str, ...] = ("overdue", "rework", "rejected_return", "urge", "supervision")
"""What ``scoring.deductions`` may charge per item: an overdue task (SLA breach), 返工 (a reopen), 退单驳回,
催办 and 督办."""


@dataclass(frozen=True, slots=True)
class Scoring:
    """考核: score = sum(weight x rate) - min(sum of min(count x deduction, cap of the item), cap total), never
    below 0. A rate with nothing to judge (denominator 0) earns its full weight. Defaults: 12345's 30/35/35."""

    weights: tuple[tuple[str, float], ...] = (("response_rate", 30.0), ("resolution_rate", 35.0),
                                               ("satisfaction_rate", 35.0))
    deductions: tuple[tuple[str, float], ...] = (("overdue", 1.0), ("rework", 2.0), ("rejected_return", 1.0),
                                                  ("urge", 0.5), ("supervision", 3.0))
    caps: tuple[tuple[str, float], ...] = (("total", 30.0),)

    def cap(self, item: str) -> float | None:
        return dict(self.caps).get(item)


@dataclass(frozen=True, slots=True)
class Cap:
    """How long one extension or suspension may be (``max``) and how many a task may have (``max_count``)."""

    max: timedelta | None = None
    max_count: int | None = None


@dataclass(frozen=True, slots=True)
class DispatchRules:
    """Dispatch control (退单审核, 改派, 延期, 缓办, 阶段性答复, 补充材料) for one category (merged)."""

    return_approval: str | None = None  # "command_center": a return waits for the command centre's review
    reassign_clocks: Literal["restart", "continue"] = "restart"
    extension: Cap = field(default_factory=Cap)
    suspension: Cap = field(default_factory=Cap)
    progress_every: timedelta | None = None
    info_request_pauses: bool = False


DISPATCH_KEYS = ("return", "reassign", "extension", "suspension", "progress_every", "info_request")


@dataclass(frozen=True)
class Rulebook:
    categories: dict[str, Category]
    version: str = ""
    calendar: str = "cn_workdays"
    timezone: str = "Asia/Shanghai"
    working_hours: tuple[tuple[time, time], ...] = DEFAULT_WORKING_HOURS
    warn_at: float = 0.8
    risk: dict[str, RiskRule] = field(default_factory=dict)
    escalate_on: frozenset[str] = ESCALATION_TRIGGERS
    urgency: dict[str, UrgencyRule] = field(default_factory=dict)
    coverage: Coverage = field(default_factory=lambda: Coverage())
    fallback: str = DEFAULT_FALLBACK
    similar: Similar = Similar()
    scoring: Scoring = field(default_factory=lambda: Scoring())
    text_retention: timedelta | None = None
    """``retention.closed_text``: how long a closed issue's free text is kept before it is crypto-shredded
    (None: kept; PIPL asks for no longer than the purpose needs)."""
    source: str = field(default="", compare=False, repr=False)
    """The file (or ``source``) it was parsed from, for messages."""
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    """``path -> line`` of the parsed document (``categories.x.handlers.street.lead`` -> 12), for messages."""

    def line(self, path: str) -> int | None:
        """The line of ``path`` (or of its nearest enclosing entry) in :attr:`source`; None when unknown."""
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return None
    dispatch: DispatchRules = field(default_factory=DispatchRules)
    dispatch_by_category: dict[str, DispatchRules] = field(default_factory=dict)

    def dispatch_for(self, category_id: str) -> DispatchRules:
        """The dispatch control rules of a category: its own keys over the top-level ones."""
        return self.dispatch_by_category.get(category_id, self.dispatch)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def category(self, category_id: str) -> Category:
        """The category with this id; KeyError if there is none."""
        try:
            return self.categories[category_id]
        except KeyError:
            raise KeyError(f"unknown category {category_id!r}") from None

    def similar_for(self, category_id: str) -> Similar:
        """The category's ``similar`` (合并办理), else the rulebook's (default 200 m within 3 days)."""
        return self.category(category_id).similar or self.similar

    def sla_for(self, category_id: str, urgency: str = "normal") -> Sla:
        """The category's SLA scaled by the urgency's ``sla_factor`` when the rulebook sets one."""
        sla = self.category(category_id).sla
        rule = self.urgency.get(urgency)
        return sla.scaled(rule.sla_factor) if rule is not None and rule.sla_factor is not None else sla


# -- loading --------------------------------------------------------------------------------------------------
def load_rulebook(path: str | Path) -> Rulebook:
    """Load and validate a rulebook file; raises :class:`shared.config.loader.ConfigError`."""
    text, name, digest = read_source(path)
    return parse_rulebook(text, name, digest=digest)


_TOP_KEYS = ("calendar", "timezone", "working_hours", "warn_at", "risk", "escalate", "urgency", "version",
             "coverage", "fallback", "similar", "scoring", "retention", *DISPATCH_KEYS)


def parse_rulebook(text: str, source: str = "<rulebook>", *, digest: str | None = None) -> Rulebook:
    """Parse and validate rulebook YAML ``text``; ``source`` names it in error messages."""
    data, doc = parse_yaml(text, source)
    top = doc.mapping(data, "", required=("categories",), optional=_TOP_KEYS)
    version = str(top["version"]) if top.get("version") is not None else (digest or text_digest(text))[:12]
    calendar = doc.choice(top.get("calendar", "cn_workdays"), "calendar", CALENDARS, "calendar")
    timezone = _timezone(doc, top.get("timezone", "Asia/Shanghai"))
    hours = _working_hours(doc, top["working_hours"]) if "working_hours" in top else DEFAULT_WORKING_HOURS
    warn_at = doc.number(top.get("warn_at", 0.8), "warn_at")
    if not 0.0 < warn_at < 1.0:
        doc.fail("warn_at", f"must be strictly between 0 and 1 (a fraction of each clock), got {warn_at:g}")

    raw_categories = doc.mapping(top["categories"], "categories")
    if not raw_categories:
        doc.fail("categories", "at least one category is required")
    categories = {cid: _category(doc, cid, raw, f"categories.{cid}") for cid, raw in raw_categories.items()}
    dispatch = _dispatch_rules(doc, top, "", DispatchRules())
    dispatch_by_category = {
        cid: _dispatch_rules(doc, doc.mapping(raw, f"categories.{cid}"), f"categories.{cid}.", dispatch)
        for cid, raw in raw_categories.items() if any(k in raw for k in DISPATCH_KEYS)}

    risk: dict[str, RiskRule] = {}
    for flag, raw in doc.mapping(top.get("risk") or {}, "risk").items():
        p = f"risk.{flag}"
        doc.ident(flag, p, "risk flag")
        m = doc.mapping(raw, p, required=("level",), optional=("urgency", "name"))
        risk[flag] = RiskRule(doc.level(m["level"], f"{p}.level", "risk level"),
                              doc.choice(m.get("urgency", "normal"), f"{p}.urgency", URGENCIES, "urgency"),
                              doc.string(m["name"], f"{p}.name") if m.get("name") is not None else None)

    escalate_on = ESCALATION_TRIGGERS
    if top.get("escalate") is not None:
        esc = doc.mapping(top["escalate"], "escalate", required=("on",))
        escalate_on = frozenset(
            doc.choice(v, f"escalate.on[{i}]", _TRIGGER_ORDER, "escalation trigger")
            for i, v in enumerate(doc.sequence(esc["on"], "escalate.on"))
        )

    urgency: dict[str, UrgencyRule] = {}
    for name, raw in doc.mapping(top.get("urgency") or {}, "urgency").items():
        p = f"urgency.{name}"
        doc.choice(name, p, URGENCIES, "urgency")
        m = doc.mapping(raw, p, optional=("min_start", "sla_factor"))
        min_start = doc.level(m["min_start"], f"{p}.min_start") if m.get("min_start") is not None else None
        factor = doc.number(m["sla_factor"], f"{p}.sla_factor") if m.get("sla_factor") is not None else None
        if factor is not None and not 0.0 < factor <= 1.0:
            doc.fail(f"{p}.sla_factor", f"must be in (0, 1] (a factor on both clocks), got {factor:g}")
        urgency[name] = UrgencyRule(min_start, factor)

    fallback = check_kind(doc, top["fallback"], "fallback") if top.get("fallback") is not None else DEFAULT_FALLBACK
    text_retention = None
    if top.get("retention") is not None:
        ret = doc.mapping(top["retention"], "retention", optional=("closed_text",))
        if ret.get("closed_text") is not None:
            text_retention = _positive(doc, ret["closed_text"], "retention.closed_text")
    return Rulebook(text_retention=text_retention,
                    categories=categories, version=version, calendar=calendar, timezone=timezone,
                    working_hours=hours, warn_at=warn_at, risk=risk, escalate_on=escalate_on, urgency=urgency,
                    coverage=_coverage(doc, top["coverage"]) if top.get("coverage") is not None else Coverage(),
                    fallback=fallback, source=source, lines=dict(doc.lines),
                    dispatch=dispatch, dispatch_by_category=dispatch_by_category,
                    similar=_similar(doc, top["similar"], "similar") if top.get("similar") is not None else Similar(),
                    scoring=_scoring(doc, top["scoring"]) if top.get("scoring") is not None else Scoring())


def _positive(doc: Document, value: Any, path: str) -> timedelta:
    d = doc.duration(value, path)
    if d <= timedelta(0):
        doc.fail(path, "the duration must be longer than zero")
    return d


def _cap(doc: Document, raw: Any, p: str) -> Cap:
    m = doc.mapping(raw, p, optional=("max", "max_count"))
    count = m.get("max_count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        doc.fail(f"{p}.max_count", f"expected a whole number >= 0, got {count!r}")
    return Cap(_positive(doc, m["max"], f"{p}.max") if m.get("max") is not None else None, count)


def _dispatch_rules(doc: Document, m: dict[str, Any], prefix: str, base: DispatchRules) -> DispatchRules:
    """The dispatch control keys of one mapping (the top level or a category) over ``base``."""
    out = base
    if m.get("return") is not None:
        r = doc.mapping(m["return"], f"{prefix}return", optional=("approval",))
        approval = r.get("approval")
        if approval is not None and approval != "none":
            approval = doc.choice(approval, f"{prefix}return.approval", ("command_center", "none"), "approval")
        out = replace(out, return_approval=None if approval in (None, "none") else approval)
    if m.get("reassign") is not None:
        r = doc.mapping(m["reassign"], f"{prefix}reassign", optional=("clocks",))
        clocks = doc.choice(r.get("clocks", "restart"), f"{prefix}reassign.clocks", ("restart", "continue"), "clocks")
        out = replace(out, reassign_clocks=clocks)  # type: ignore[arg-type]
    if m.get("extension") is not None:
        out = replace(out, extension=_cap(doc, m["extension"], f"{prefix}extension"))
    if m.get("suspension") is not None:
        out = replace(out, suspension=_cap(doc, m["suspension"], f"{prefix}suspension"))
    if m.get("progress_every") is not None:
        out = replace(out, progress_every=_positive(doc, m["progress_every"], f"{prefix}progress_every"))
    if m.get("info_request") is not None:
        r = doc.mapping(m["info_request"], f"{prefix}info_request", optional=("pauses",))
        pauses = r.get("pauses", False)
        if not isinstance(pauses, bool):
            doc.fail(f"{prefix}info_request.pauses", f"expected true or false, got {pauses!r}")
        out = replace(out, info_request_pauses=pauses)
    return out


def _similar(doc: Document, raw: Any, p: str) -> Similar:
    m = doc.mapping(raw, p, optional=("radius_m", "within"))
    radius = doc.number(m.get("radius_m", 200), f"{p}.radius_m")
    if not 0.0 < radius <= 100_000:
        doc.fail(f"{p}.radius_m", f"must be in (0, 100000] metres, got {radius:g}")
    within = doc.duration(m["within"], f"{p}.within") if m.get("within") is not None else timedelta(days=3)
    if within <= timedelta(0):
        doc.fail(f"{p}.within", "the duration must be longer than zero")
    return Similar(float(radius), within)


def _scoring(doc: Document, raw: Any) -> Scoring:
    m = doc.mapping(raw, "scoring", optional=("weights", "deductions", "caps"))
    default = Scoring()

    def table(key: str, names: tuple[str, ...], what: str) -> tuple[tuple[str, float], ...] | None:
        if m.get(key) is None:
            return None
        out: list[tuple[str, float]] = []
        for name, value in doc.mapping(m[key], f"scoring.{key}").items():
            p = f"scoring.{key}.{name}"
            doc.choice(name, p, names, what)
            n = doc.number(value, p)
            if n < 0:
                doc.fail(p, f"must not be negative, got {n:g}")
            out.append((name, float(n)))
        return tuple(out)

    weights = table("weights", SCORE_RATES, "rate")
    if weights is not None and not sum(w for _, w in weights) > 0:
        doc.fail("scoring.weights", "the weights must add up to more than zero (they are the full marks)")
    deductions = table("deductions", DEDUCTIONS, "deduction")
    caps = table("caps", (*DEDUCTIONS, "total"), "cap")
    return Scoring(weights if weights is not None else default.weights,
                   deductions if deductions is not None else default.deductions,
                   caps if caps is not None else default.caps)


def _coverage(doc: Document, raw: Any) -> Coverage:
    m = doc.mapping(raw, "coverage", optional=("target", "period"))
    target = doc.number(m.get("target", 0.9), "coverage.target")
    if not 0.0 < target <= 1.0:
        doc.fail("coverage.target", f"must be in (0, 1] (a share of households), got {target:g}")
    period = doc.duration(m["period"], "coverage.period") if m.get("period") is not None else timedelta(days=30)
    if period <= timedelta(0):
        doc.fail("coverage.period", "the duration must be longer than zero")
    return Coverage(target, period)


def _timezone(doc: Document, value: Any) -> str:
    name = doc.string(value, "timezone")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        doc.fail("timezone", f"unknown time zone {name!r} (an IANA name such as Asia/Shanghai)")
    return name


_HOURS = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")


def _working_hours(doc: Document, value: Any) -> tuple[tuple[time, time], ...]:
    spans: list[tuple[time, time]] = []
    items = doc.sequence(value, "working_hours")
    if not items:
        doc.fail("working_hours", "at least one span such as \"08:30-12:00\" is required")
    for i, raw in enumerate(items):
        p = f"working_hours[{i}]"
        m = _HOURS.match(raw.strip()) if isinstance(raw, str) else None
        if m is None:
            doc.fail(p, f"expected \"HH:MM-HH:MM\" (quoted), got {raw!r}")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            doc.fail(p, f"{raw!r} is not a time of day (00:00 to 23:59)")
        start, end = time(h1, m1), time(h2, m2)
        if start >= end:
            doc.fail(p, f"{raw!r} ends before it starts")
        if spans and start < spans[-1][1]:
            doc.fail(p, f"{raw!r} overlaps or precedes the previous span; list spans in ascending order")
        spans.append((start, end))
    return tuple(spans)


def _category(doc: Document, cid: str, raw: Any, p: str) -> Category:
    doc.ident(cid, p, "category id")
    m = doc.mapping(raw, p, required=("name", "start", "sla"),
                    optional=("group", "description", "handlers", "evidence", "intake", "similar", *DISPATCH_KEYS))
    sla_raw = doc.mapping(m["sla"], f"{p}.sla", required=("acknowledge", "resolve"), optional=("clock", "review"))
    sla = Sla(
        doc.duration(sla_raw["acknowledge"], f"{p}.sla.acknowledge"),
        doc.duration(sla_raw["resolve"], f"{p}.sla.resolve"),
        doc.choice(sla_raw.get("clock", "natural"), f"{p}.sla.clock", CLOCKS, "clock"),  # type: ignore[arg-type]
        doc.duration(sla_raw["review"], f"{p}.sla.review") if sla_raw.get("review") is not None else None,
    )
    for part in ("acknowledge", "resolve"):
        if getattr(sla, part) <= timedelta(0):
            doc.fail(f"{p}.sla.{part}", "the duration must be longer than zero")
    if sla.acknowledge > sla.resolve:
        doc.fail(f"{p}.sla.acknowledge", "the acknowledge clock is longer than the resolve clock")
    if sla.review is not None and sla.review <= timedelta(0):
        doc.fail(f"{p}.sla.review", "the duration must be longer than zero")
    handlers: dict[Level, Handler] = {}
    for lv, hraw in doc.mapping(m.get("handlers") or {}, f"{p}.handlers").items():
        hp = f"{p}.handlers.{lv}"
        level = doc.level(lv, hp, "handler level")
        hm = doc.mapping(hraw, hp, required=("lead",), optional=("co",))
        lead = check_kind(doc, hm["lead"], f"{hp}.lead")
        co_raw = hm.get("co") or []
        co_list = [co_raw] if isinstance(co_raw, str) else doc.sequence(co_raw, f"{hp}.co")
        co: list[str] = []
        for i, k in enumerate(co_list):
            kind = check_kind(doc, k, f"{hp}.co[{i}]")
            if kind == lead or kind in co:
                doc.fail(f"{hp}.co[{i}]", f"'{kind}' is listed twice (as lead or co-handler)")
            co.append(kind)
        handlers[level] = Handler(lead, tuple(co))
    group = doc.string(m["group"], f"{p}.group") if m.get("group") is not None else None
    description = doc.string(m["description"], f"{p}.description") if m.get("description") is not None else None
    evidence = Evidence()
    if m.get("evidence") is not None:
        em = doc.mapping(m["evidence"], f"{p}.evidence", optional=EVIDENCE_STAGES)
        evidence = Evidence(**{stage: doc.choice(kind, f"{p}.evidence.{stage}", EVIDENCE_KINDS, "evidence kind")
                               for stage, kind in em.items() if kind is not None})
    intake = doc.choice(m.get("intake", "auto"), f"{p}.intake", INTAKE_MODES, "intake mode")
    return Category(cid, doc.string(m["name"], f"{p}.name"), doc.level(m["start"], f"{p}.start", "start level"),
                    sla, handlers, group, description, evidence, intake,
                    _similar(doc, m["similar"], f"{p}.similar") if m.get("similar") is not None else None)
