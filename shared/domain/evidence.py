"""Evidence rules (rulebook ``evidence: {report: photo, resolve: photo}``) and the media an issue holds.

A rule names itself (``categories.<id>.evidence.<stage>``) so that a refusal says which rule it applies.
A report must carry a photo of phase ``before``; a resolve (a task's, or the reporter's own on the spot)
one of phase ``after``. Pure: the callers look the rule up in the rulebook in force.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from .errors import Invalid

STAGE_PHASE = {"report": "before", "resolve": "after"}


class Phased(Protocol):
    @property
    def phase(self) -> str: ...


def rule_name(category: str, stage: str) -> str:
    return f"categories.{category}.evidence.{stage}"


def require_photo(rule: str | None, media: Iterable[Phased], phase: str) -> None:
    """Refuse (422 naming ``media`` and the rule) when ``rule`` is set and no medium has ``phase``."""
    if rule is None or any(m.phase == phase for m in media):
        return
    raise Invalid(f"the rulebook requires a photo (phase {phase}) here: {rule}", field="media", rule=rule)
