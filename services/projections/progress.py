"""How far the read models reflect the stream: a sequence that only moves forward, and a bounded wait
for it (``Needle-Min-Seq``, the dashboard's live updates). Shared by the projection worker and by the
checkpoint follower of a process that does not run the worker."""
from __future__ import annotations

import asyncio


class Progress:
    def __init__(self) -> None:
        self.seq = 0
        self._advanced = asyncio.Condition()

    async def advance(self, seq: int) -> None:
        if seq > self.seq:
            async with self._advanced:
                self.seq = seq
                self._advanced.notify_all()

    async def wait_for(self, seq: int, timeout: float) -> bool:
        """True once the read models reflect stream sequence ``seq`` (bounded wait)."""
        if self.seq >= seq:
            return True
        try:
            async with asyncio.timeout(timeout), self._advanced:
                await self._advanced.wait_for(lambda: self.seq >= seq)
            return True
        except TimeoutError:
            return self.seq >= seq
