"""Services (GeoReport v2 "service list" and "service definition") from the rulebook: one service per category.

Pure: the rulebook comes in as an argument. Every service has the same three attributes:

* ``urgency``: singlevaluelist normal | urgent | emergency (default normal);
* ``risk``: multivaluelist of the rulebook's risk flags (omitted when the rulebook has none);
* ``grid``: string, an org grid id, for a client that knows the grid instead of a point or an address.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from shared.config.rulebook import URGENCIES, Category, Rulebook

URGENCY_NAMES: dict[str, str] = {"normal": "一般 (normal)", "urgent": "紧急 (urgent)", "emergency": "特急 (emergency)"}
ATTRIBUTE_CODES: frozenset[str] = frozenset({"urgency", "risk", "grid"})


def keywords(cat: Category) -> str:
    words = [cat.name, *([cat.group] if cat.group else []), cat.id.replace("_", " ")]
    return ", ".join(dict.fromkeys(words))


def service(cat: Category) -> dict[str, Any]:
    return {
        "service_code": cat.id,
        "service_name": cat.name,
        "description": cat.description or cat.name,
        "metadata": True,  # every service has the attributes below
        "type": "realtime",
        "keywords": keywords(cat),
        "group": cat.group or "",
    }


def service_list(rulebook: Rulebook) -> list[dict[str, Any]]:
    return [service(cat) for cat in rulebook.categories.values()]


def attributes(rulebook: Rulebook) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{
        "variable": True, "code": "urgency", "datatype": "singlevaluelist", "required": False,
        "datatype_description": "one key; normal when not given",
        "order": 1, "description": "How urgent is it? (紧急程度)",
        "values": [{"key": u, "name": URGENCY_NAMES.get(u, u)} for u in URGENCIES],
    }]
    if rulebook.risk:
        out.append({
            "variable": True, "code": "risk", "datatype": "multivaluelist", "required": False,
            "datatype_description": "zero or more keys, sent as attribute[risk][]=key",
            "order": 2, "description": "Risk signs that lift the request to a higher level at once (风险研判)",
            "values": [{"key": flag, "name": rule.name or flag.replace("_", " ")}
                       for flag, rule in rulebook.risk.items()],
        })
    out.append({
        "variable": True, "code": "grid", "datatype": "string", "required": False,
        "datatype_description": "a grid id of the org tree",
        "order": len(out) + 1,
        "description": "The grid (网格) of the request, when neither lat/long nor address_string locate it",
        "values": [],
    })
    return out


def definition(rulebook: Rulebook, code: str) -> dict[str, Any]:
    """The service definition; KeyError for an unknown service code."""
    rulebook.category(code)
    return {"service_code": code, "attributes": attributes(rulebook)}


def human(delta: timedelta) -> str:
    """``timedelta(hours=26)`` -> ``"1 day 2 hours"``."""
    seconds = int(delta.total_seconds())
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n} {unit}{'s' if n != 1 else ''}")
    return " ".join(parts) or f"{seconds} seconds"


def service_notice(rulebook: Rulebook, code: str, urgency: str = "normal") -> str:
    """What the resident can expect: the category's SLA clocks (scaled by urgency when the rulebook says so)."""
    try:
        sla = rulebook.sla_for(code, urgency)
    except KeyError:
        return "Routed by the rulebook (权责清单) to the responsible department."
    clock = "working time" if sla.clock == "working" else "natural time"
    return (f"Routed by the rulebook (权责清单) to the responsible department: acknowledged within "
            f"{human(sla.acknowledge)} and resolved within {human(sla.resolve)} ({clock}), "
            "escalated one level up when a deadline is missed.")
