"""What a replay found: the stories' issues, their final views and their routing history."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .client import short_type


@dataclass
class Hop:
    """One routing of an issue: the level and area that owned it and the lead department."""

    level: str
    owner_area: str
    lead: str | None
    reason: str


@dataclass
class StoryResult:
    key: str
    title: str
    issue_ids: list[str] = field(default_factory=list)
    campaign: str | None = None
    error: str | None = None


@dataclass
class DemoResult:
    stories: list[StoryResult]
    issues: dict[str, dict[str, Any]] = field(default_factory=dict)  # final issue views
    trails: dict[str, list[Hop]] = field(default_factory=dict)  # routing history of the stories' issues

    @property
    def all_closed(self) -> bool:
        ids = [i for s in self.stories for i in s.issue_ids]
        return (bool(ids) and all(s.error is None for s in self.stories)
                and all(self.issues.get(i, {}).get("status") == "closed" for i in ids))


def trail(events: list[dict[str, Any]]) -> list[Hop]:
    """The routing history from an issue's events: each routing with the lead dispatched with it."""
    hops: list[Hop] = []
    for e in events:
        t, data = short_type(e["type"]), e["data"]
        if t == "issue.routed":
            hops.append(Hop(data["level"], data["owner_area"], None, data["reason"]))
        elif t == "task.dispatched" and data["role"] == "lead" and hops and hops[-1].lead is None:
            hops[-1].lead = data["department"]
    return hops
