"""One wildcard inbox subscription multiplexed over many concurrent multi-message replies
(batch direct get answers with many messages and an end-of-batch status)."""
from __future__ import annotations

import asyncio
import itertools

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription


class ReplyMux:
    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._queues: dict[str, asyncio.Queue[Msg]] = {}
        self._ids = itertools.count()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_msg, pending_msgs_limit=1_000_000)

    async def _on_msg(self, msg: Msg) -> None:
        q = self._queues.get(msg.subject.rsplit(".", 1)[1])
        if q is not None:
            q.put_nowait(msg)

    def open(self) -> tuple[str, asyncio.Queue[Msg], str]:
        token = str(next(self._ids))
        q: asyncio.Queue[Msg] = asyncio.Queue()
        self._queues[token] = q
        return f"{self._prefix}.{token}", q, token

    def close(self, token: str) -> None:
        self._queues.pop(token, None)
