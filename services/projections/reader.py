"""Reading the whole event stream fast: an ephemeral, unacknowledged pull consumer fetched in large batches.

``needle rebuild`` reads through it, and so does the baseline of ``needle bench projections`` (the same
consumer, the same fetch size, no decoding): the benchmark's ratio compares like with like."""
from __future__ import annotations

import contextlib
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from shared.events import subjects as sj

Raw = tuple[int, str, bytes]  # (stream sequence, subject, payload)


def stream_seq(reply: str) -> int:
    """The stream sequence of a JetStream message, from its ack subject (what ``Msg.metadata`` parses, without
    building the metadata objects): ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>...`` (9 tokens) or the form
    with domain and account hash (``$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>...``)."""
    tokens = reply.split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise ValueError(f"not a JetStream message: {reply!r}")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


class StreamReader:
    """Every message of NEEDLE_EVENTS in order, up to a sequence, in batches of up to ``size``."""

    def __init__(self, js: JetStreamContext, size: int = 2000) -> None:
        self.js, self.size = js, size
        self.sub: Any = None
        self.seq = 0  # the last stream sequence handed out
        self._ahead: list[Raw] = []  # fetched past ``upto`` (the stream grew): kept for the next call

    async def fetch(self, upto: int, timeout: float = 2.0) -> list[Raw]:
        """The next messages after ``self.seq`` and at most ``upto`` (empty when none came within ``timeout``)."""
        if self._ahead:  # in order: everything before them was handed out already
            out = [r for r in self._ahead if r[0] <= upto]
            self._ahead = [r for r in self._ahead if r[0] > upto]
            if out:
                self.seq = out[-1][0]
            return out
        if self.seq >= upto:
            return []
        if self.sub is None:
            self.sub = await self.js.pull_subscribe(
                sj.ALL_EVENTS, stream=sj.EVENTS_STREAM,
                config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                                      inactive_threshold=60, max_waiting=1))
        try:
            msgs = await self.sub.fetch(min(self.size, upto - self.seq), timeout=timeout)
        except Exception as exc:
            if "Timeout" in type(exc).__name__:
                return []
            raise
        out = []
        for m in msgs:
            raw = (stream_seq(m.reply), m.subject, m.data)
            if raw[0] <= self.seq:
                continue
            (out if raw[0] <= upto else self._ahead).append(raw)
        if out:
            self.seq = out[-1][0]
        return out

    async def close(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):  # the ephemeral consumer expires by itself
                await self.sub.unsubscribe()
