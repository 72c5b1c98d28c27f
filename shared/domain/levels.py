"""The territory levels, lowest first. Pure: no IO."""
from __future__ import annotations

from enum import StrEnum


class Level(StrEnum):
    grid = "grid"
    community = "community"
    street = "street"
    district = "district"
    city = "city"

    @property
    def rank(self) -> int:
        return LEVEL_ORDER.index(self)

    def up(self) -> Level | None:
        """The next level up, or None at the city (never escalate past the city)."""
        i = self.rank
        return LEVEL_ORDER[i + 1] if i + 1 < len(LEVEL_ORDER) else None


LEVEL_ORDER: tuple[Level, ...] = (Level.grid, Level.community, Level.street, Level.district, Level.city)
