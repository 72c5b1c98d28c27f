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
        self._batches: dict[str, tuple[list[Msg], asyncio.Future[list[Msg]]]] = {}
        self._ids = itertools.count()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_msg, pending_msgs_limit=1_000_000)

    async def _on_msg(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[1]
        batch = self._batches.get(token)
        if batch is not None:
            msgs, done = batch
            msgs.append(msg)
            if msg.headers and "Status" in msg.headers and not done.done():  # end of batch, or an error
                done.set_result(msgs)

    def open_batch(self) -> tuple[str, asyncio.Future[list[Msg]], str]:
        """A reply subject whose messages are gathered until one carries a status (a batch direct get's
        end-of-batch 204, or 404 / an error): one future per request, not one wait per message."""
        token = str(next(self._ids))
        done: asyncio.Future[list[Msg]] = asyncio.get_running_loop().create_future()
        self._batches[token] = ([], done)
        return f"{self._prefix}.{token}", done, token

    def close(self, token: str) -> None:
        self._batches.pop(token, None)
