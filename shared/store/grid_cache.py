"""issue id -> grid, least recently used dropped first (a grid never changes once reported).
Used by every area filter over the event stream (SSE, webhooks)."""
from __future__ import annotations

from collections import OrderedDict


class GridCache:
    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self._map: OrderedDict[str, str] = OrderedDict()

    def get(self, issue_id: str) -> str | None:
        grid = self._map.get(issue_id)
        if grid is not None:
            self._map.move_to_end(issue_id)
        return grid

    def put(self, issue_id: str, grid: str) -> None:
        self._map[issue_id] = grid
        self._map.move_to_end(issue_id)
        while len(self._map) > self.size:
            self._map.popitem(last=False)
