"""One wildcard inbox subscription multiplexed over many concurrent replies: multi-message ones (batch
direct get answers with many messages and an end-of-batch status) and single ones (a publish's ack).

``request`` is what ``nats.Client.request`` does, for the intake's hot path at less cost: nats-py's
takes a fresh ``secrets.token_hex`` (a getrandom system call) per request and waits through
``asyncio.wait_for``; here a request is a counter, one future and one timer handle."""
from __future__ import annotations

import asyncio
import itertools

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

NO_RESPONDERS = "503"


class ReplyMux:
    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._batches: dict[str, tuple[list[Msg], asyncio.Future[list[Msg]]]] = {}
        self._single: dict[str, asyncio.Future[Msg]] = {}
        self._ids = itertools.count()
        self._sub: Subscription | None = None
        self._starting: asyncio.Future[Subscription] | None = None

    @property
    def started(self) -> bool:
        return self._sub is not None

    async def start(self) -> None:
        """Subscribe once (``request`` calls it when nobody has: stores built for appends only)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(
                self._nc.subscribe(f"{self._prefix}.*", cb=self._on_msg, pending_msgs_limit=1_000_000))
        self._sub = await asyncio.shield(self._starting)

    async def _on_msg(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[1]
        waiter = self._single.pop(token, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(msg)
            return
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

    async def request(self, subject: str, payload: bytes, *, headers: dict[str, str] | None = None,
                      timeout: float = 5.0) -> Msg:
        """One request, one reply (raises nats' TimeoutError, or NoRespondersError when nothing listens)."""
        if not self.started:
            await self.start()
        token = "r" + str(next(self._ids))  # "r": never a batch's token, which are bare numbers
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Msg] = loop.create_future()
        self._single[token] = waiter
        expiry = loop.call_later(timeout, _expire, waiter)
        try:
            await self._nc.publish(subject, payload, reply=f"{self._prefix}.{token}", headers=headers)
            msg = await waiter
        finally:
            expiry.cancel()
            self._single.pop(token, None)
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS and not msg.data:
            raise NoRespondersError
        return msg


def _expire(waiter: asyncio.Future[Msg]) -> None:
    if not waiter.done():
        waiter.set_exception(NatsTimeout())
