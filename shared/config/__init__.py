"""Configuration: the org tree and the rulebook (contract format of DESIGN.md), loaded and validated.

>>> from shared.config import load_org, load_rulebook
>>> org = load_org("deploy/org/zhoushan.yaml")
>>> rules = load_rulebook("deploy/rules/zhoushan.yaml")

Every problem in a file raises :class:`ConfigError` naming the file, line, path and problem.
"""
from shared.config.loader import ConfigError, format_duration, parse_duration
from shared.config.org import KIND_PATTERN, Area, Department, Location, OrgTree, load_org, parse_org
from shared.config.rulebook import (
    CALENDARS,
    CLOCKS,
    ESCALATION_TRIGGERS,
    URGENCIES,
    Category,
    Handler,
    RiskRule,
    Rulebook,
    Sla,
    UrgencyRule,
    load_rulebook,
    parse_rulebook,
)

__all__ = [
    "CALENDARS",
    "CLOCKS",
    "ESCALATION_TRIGGERS",
    "KIND_PATTERN",
    "URGENCIES",
    "Area",
    "Category",
    "ConfigError",
    "Department",
    "Handler",
    "Location",
    "OrgTree",
    "RiskRule",
    "Rulebook",
    "Sla",
    "UrgencyRule",
    "format_duration",
    "load_org",
    "load_rulebook",
    "parse_duration",
    "parse_org",
    "parse_rulebook",
]
