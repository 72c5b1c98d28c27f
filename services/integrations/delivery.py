"""Delivering one webhook: a durable JetStream pull consumer ``webhook-<id>`` and the loop that feeds it
to the receiver.

Each fetched batch is filtered by area, grouped by issue (stream order kept inside a group) and the
groups are delivered concurrently (bounded); a group retries each event in place (exponential backoff
with full jitter) before it moves to the issue's next event, so the receiver sees one issue's events in
order. An event that still fails after ``max_attempts`` is parked in the dead-letter bucket. A message
is acked only once it was delivered (2xx), parked, or filtered out: at least once. While a batch is in
hand its unacked messages are kept alive with ``in_progress``; on a clean stop they are nak'ed so a
restart redelivers them first.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import structlog
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from shared.config import OrgTree
from shared.domain.errors import Unavailable
from shared.events import subjects as sj
from shared.events.codec import Envelope, decode
from shared.events.models import IssueReported
from shared.privacy.issuekeys import IssueKeys
from shared.privacy.residents import resident_id_only
from shared.store.grid_cache import GridCache

from . import signing
from .registry import DeadLetter, Registry, Webhook
from .targets import AllowList

log = structlog.get_logger("needle.webhooks")
CONTENT_TYPE = "application/cloudevents+json"
MAX_RESPONSE_BYTES = 64 * 1024  # read at most this much of a receiver's answer
USER_AGENT = "needle-webhooks/1"


@dataclass
class DeliveryConfig:
    base_s: float = 0.5  # first backoff ceiling; doubles per attempt (full jitter: uniform(0, ceiling))
    cap_s: float = 30.0  # backoff ceiling never grows past this
    max_attempts: int = 8  # then the event is parked in the dead-letter bucket
    timeout_s: float = 10.0  # per request
    batch: int = 256  # events fetched at once per webhook
    concurrency: int = 64  # issues delivered at once per webhook
    ack_wait_s: float = 30.0  # consumer ack wait (kept alive with in_progress while working)
    fetch_timeout_s: float = 1.0
    allow_private: tuple[str, ...] = ()  # hosts and CIDRs a webhook may reach though not public (targets.py)
    max_per_owner: int = 20  # webhooks one token subject may have registered at once

    @classmethod
    def from_settings(cls, settings: Any) -> DeliveryConfig:
        """Reads ``settings.webhook_<field>`` where Settings defines it; the defaults otherwise."""
        values = {f.name: getattr(settings, f"webhook_{f.name}") for f in fields(cls)
                  if getattr(settings, f"webhook_{f.name}", None) is not None}
        if "allow_private" in values:
            values["allow_private"] = tuple(values["allow_private"])
        return cls(**values)


def backoff(attempt: int, base_s: float, cap_s: float, rand: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**attempt)), ``attempt`` counting from 0."""
    return rand() * min(cap_s, base_s * (2 ** min(attempt, 62)))


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    status: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Payload:
    body: bytes
    event_id: str
    ce_type: str
    grid: str | None  # known from the event itself (issue_reported)


def render(data: bytes, seq: int, env: Envelope | None = None) -> Payload:
    """A stored event -> the CloudEvent JSON sent to receivers (upcast, with its stream ``sequence``; a
    reported resident as ``{id}``); ``env``: the event already decoded (and its free text opened)."""
    grid: str | None = None
    try:
        env = env or decode(data, seq)
        ce = env.to_cloudevent()
        if isinstance(env.data, IssueReported):
            grid = env.data.grid
            resident_id_only(ce)  # receivers are integrators: the resident's id, never even the sealed data
    except ValueError:  # a type this needle does not know: pass the stored CloudEvent on as it is
        ce = orjson.loads(data)
        ce["sequence"] = seq
    return Payload(orjson.dumps(ce), str(ce.get("id", "")), str(ce.get("type", "")), grid)


async def render_opened(data: bytes, seq: int, texts: IssueKeys | None) -> Payload:
    """``render``, the issue's free text opened: receivers are integrators, who read every event in clear
    (``[erased]`` once the issue's key is destroyed)."""
    if texts is None or b'"sealed"' not in data:
        return render(data, seq)
    try:
        env = decode(data, seq)
    except ValueError:
        return render(data, seq)
    return render(data, seq, await texts.open_one(env))


class Sender:
    """POSTs signed CloudEvents through one shared client and its connection pool.

    With needle's own transport the request goes straight to it: the AsyncClient's per-request machinery
    (auth flow, cookies, header merging, hooks) cost ~100 µs of the ~125 µs a delivery spends in httpx."""

    def __init__(self, client: httpx.AsyncClient, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.client, self.transport = client, transport
        self._urls: dict[str, httpx.URL] = {}

    @classmethod
    def pooled(cls, max_per_origin: int = 256, allow: AllowList | None = None) -> Sender:
        """One HTTP/1.1 client with needle's keep-alive pool (see transport.py for why not httpcore's), connecting
        only to public targets and those ``allow`` lists (targets.py; none when not given)."""
        from .transport import KeepAliveTransport

        transport = KeepAliveTransport(max_per_origin=max_per_origin, max_response_bytes=MAX_RESPONSE_BYTES,
                                       allow=allow or AllowList())
        client = httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False,
                                   timeout=httpx.Timeout(10.0), headers={"User-Agent": USER_AGENT})
        return cls(client, transport)

    def _url(self, url: str) -> httpx.URL:
        u = self._urls.get(url)
        if u is None:
            if len(self._urls) > 10_000:
                self._urls.clear()
            u = self._urls[url] = httpx.URL(url)
        return u

    async def send(self, hook: Webhook, p: Payload, timeout_s: float) -> Outcome:
        headers = {"User-Agent": USER_AGENT, "Content-Type": CONTENT_TYPE, "Needle-Webhook-Id": hook.id,
                   "Needle-Event-Id": p.event_id, "Needle-Event-Type": p.ce_type,
                   signing.HEADER: signing.sign(hook.secret, p.body, int(time.time()))}
        try:
            if self.transport is not None:
                timeouts = {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": timeout_s}
                req = httpx.Request("POST", self._url(hook.url), content=p.body, headers=headers,
                                    extensions={"timeout": timeouts})
                r = await self.transport.handle_async_request(req)
            else:
                r = await self.client.post(hook.url, content=p.body, headers=headers, timeout=timeout_s)
        except httpx.HTTPError as exc:
            return Outcome(False, None, f"{type(exc).__name__}: {exc}"[:300])
        except Exception as exc:  # anything else the receiver provokes is a failed attempt too, never a crash
            log.warning("webhook request failed unexpectedly", webhook=hook.id, error=repr(exc))
            return Outcome(False, None, f"{type(exc).__name__}: {exc}"[:300])
        if 200 <= r.status_code < 300:
            return Outcome(True, r.status_code)
        return Outcome(False, r.status_code, f"HTTP {r.status_code}")


@dataclass
class Counters:
    delivered: int = 0
    failed_attempts: int = 0
    parked: int = 0
    filtered: int = 0


def consumer_filter(types: tuple[str, ...]) -> str:
    """The consumer's one filter subject. Several types share one wildcard and are picked client-side:
    nats-server 2.15's multi-filter consumers (``filter_subjects``) slow down with the number of subjects
    in the stream (measured: ~1,100 events/s at 20,000 issues, against ~25,000/s with one wildcard)."""
    if len(types) == 1:
        return sj.filter_of_type(types[0])
    return sj.ALL_EVENTS if any(t in sj.NON_ISSUE_EVENTS for t in types) else f"{sj.EVENTS_ROOT}.issue.>"


def consumer_name(hook_id: str) -> str:
    return f"webhook-{hook_id}"


def group_of(subject: str) -> str:
    parts = subject.split(".")
    return parts[3] if len(parts) == 5 and parts[2] == "issue" else parts[2]


class Deliverer:
    def __init__(self, hook: Webhook, js: JetStreamContext, org: OrgTree, grids: GridCache, sender: Sender,
                 registry: Registry, config: Callable[[], DeliveryConfig], texts: IssueKeys | None = None) -> None:
        self.hook, self.js, self.org, self.grids = hook, js, org, grids
        self.texts = texts
        self.sender, self.registry, self.config = sender, registry, config
        self.counters = Counters()
        self.wanted = frozenset(hook.types)
        self.sub: Any = None
        self.sem = asyncio.Semaphore(config().concurrency)

    @property
    def consumer(self) -> str:
        return consumer_name(self.hook.id)

    async def subscribe(self) -> Any:
        """Creates (or binds to) the durable consumer; idempotent."""
        if self.sub is None:
            cfg = self.config()
            cc = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                opt_start_seq=max(1, self.hook.start_seq), ack_wait=cfg.ack_wait_s,
                                max_ack_pending=max(1024, cfg.batch * 4), max_deliver=-1)
            self.sub = await self.js.pull_subscribe(consumer_filter(self.hook.types), durable=self.consumer,
                                                    stream=sj.EVENTS_STREAM, config=cc)
        return self.sub

    async def run(self) -> None:
        delay = 0.5
        while self.sub is None:
            try:
                await self.subscribe()
            except Exception as exc:
                log.warning("webhook consumer unavailable; retrying", webhook=self.hook.id, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        try:
            while True:
                try:
                    msgs: list[Msg] = await self.sub.fetch(self.config().batch, timeout=self.config().fetch_timeout_s)
                except Exception as exc:  # nats-py raises its own TimeoutError: "no messages"
                    if "Timeout" not in type(exc).__name__:
                        log.warning("webhook fetch failed", webhook=self.hook.id, error=repr(exc))
                        await asyncio.sleep(0.5)
                    continue
                if msgs:
                    await self.process(msgs)
        finally:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()

    async def process(self, msgs: list[Msg]) -> None:
        groups: dict[str, list[Msg]] = {}
        for m in msgs:
            if m.subject.rsplit(".", 1)[-1] in self.wanted:
                groups.setdefault(group_of(m.subject), []).append(m)
            else:  # another type under the consumer's wildcard
                await m.ack()
        pending: dict[int, Msg] = {id(m): m for g in groups.values() for m in g}
        heart = asyncio.create_task(self._keep_alive(pending))
        try:
            async with asyncio.TaskGroup() as tg:  # one group failing stops the others: order is kept
                for g in groups.values():
                    tg.create_task(self._group(g, pending))
        except BaseException:
            for m in pending.values():  # a stop or a failure: hand them back at once (redelivered first)
                with contextlib.suppress(Exception):
                    await m.nak()
            raise
        finally:
            heart.cancel()

    async def _keep_alive(self, pending: dict[int, Msg]) -> None:
        every = max(0.5, self.config().ack_wait_s / 3)
        while True:
            await asyncio.sleep(every)
            for m in list(pending.values()):
                with contextlib.suppress(Exception):
                    await m.in_progress()

    async def _group(self, ms: list[Msg], pending: dict[int, Msg]) -> None:
        async with self.sem:
            for m in ms:
                await self._one(m)
                pending.pop(id(m), None)

    async def _rendered(self, data: bytes, seq: int) -> Payload:
        """The payload, waiting while the issue keys do not answer (the message is kept in progress meanwhile)."""
        delay = 0.2
        while True:
            try:
                return await render_opened(data, seq, self.texts)
            except Unavailable as exc:
                log.warning("issue keys unavailable; delivery waits", webhook=self.hook.id, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _one(self, m: Msg) -> None:
        seq = m.metadata.sequence.stream
        try:
            p = await self._rendered(m.data, seq)
        except Exception as exc:  # not even JSON: park it rather than fail on it forever
            await self.park(DeadLetter(webhook=self.hook.id, seq=seq, event_id=None, type=None, subject=m.subject,
                                       attempts=0, status=None, error=f"undecodable event: {exc!r}"[:300],
                                       parked_at=now_iso()))
            await m.ack()
            return
        if self.hook.area is not None and not await self._in_area(m.subject, p):
            self.counters.filtered += 1
            await m.ack()
            return
        out, attempts = await self.deliver(p)
        if not out.ok:
            await self.park(DeadLetter(webhook=self.hook.id, seq=seq, event_id=p.event_id, type=p.ce_type,
                                       subject=m.subject, attempts=attempts, status=out.status, error=out.error,
                                       parked_at=now_iso()))
        await m.ack()

    async def deliver(self, p: Payload) -> tuple[Outcome, int]:
        attempt = 0
        while True:
            cfg = self.config()
            out = await self.sender.send(self.hook, p, cfg.timeout_s)
            attempt += 1
            if out.ok:
                self.counters.delivered += 1
                return out, attempt
            self.counters.failed_attempts += 1
            if attempt >= cfg.max_attempts:
                return out, attempt
            await asyncio.sleep(backoff(attempt - 1, cfg.base_s, cfg.cap_s))

    async def park(self, letter: DeadLetter) -> None:
        log.warning("webhook event parked", webhook=self.hook.id, seq=letter.seq, status=letter.status,
                    error=letter.error, attempts=letter.attempts)
        delay = 0.5
        while True:  # never ack an event that is neither delivered nor parked
            try:
                await self.registry.park(letter)
                self.counters.parked += 1
                return
            except Exception as exc:
                log.warning("could not park; retrying", webhook=self.hook.id, seq=letter.seq, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _in_area(self, subject: str, p: Payload) -> bool:
        try:
            issue_id, _ = sj.parse_issue_subject(subject)
        except ValueError:
            return False  # rulebook and resident events belong to no area
        grid = p.grid or await self._grid_of(issue_id)
        if grid is None:
            return False
        self.grids.put(issue_id, grid)
        try:
            return bool(self.org.is_under(grid, self.hook.area or ""))
        except KeyError:
            return False

    async def _grid_of(self, issue_id: str) -> str | None:
        """The grid the issue was reported in (its ``issue_reported`` event, by direct get); None if unknown."""
        grid = self.grids.get(issue_id)
        delay = 0.2
        while grid is None:
            try:
                raw = await self.js.get_last_msg(sj.EVENTS_STREAM, sj.issue_event(issue_id, IssueReported.name),
                                                 direct=True)
            except NotFoundError:
                return None
            except Exception as exc:  # NATS away: hold this issue's events rather than guess
                log.warning("grid lookup failed; retrying", issue=issue_id, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            found = (orjson.loads(raw.data or b"{}").get("data") or {}).get("grid")
            return found if isinstance(found, str) else None
        return grid


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
