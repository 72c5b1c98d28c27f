"""Integrators' routes: the published event schemas and the live event stream (Server-Sent Events).

``GET /v1/events/stream`` gives each client its own JetStream ordered consumer starting right after
the client's ``Last-Event-ID`` (a stream sequence), so a reconnect has no gap and no duplicate. The
consumer's messages go into a bounded per-client queue; a client that falls ``QUEUE_MAX`` events
behind gets a last ``needle.stream.overflow`` event naming the last id it was sent, and the stream
closes: it resumes with Last-Event-ID, and the server's memory per client stays bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from functools import cache
from typing import Annotated, Any

import anyio
import orjson
import structlog
from fastapi import APIRouter, Header, Query, Request, Response
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from shared.domain.errors import Invalid, NotFound, Unavailable
from shared.events import schemas
from shared.events import subjects as sj
from shared.events.codec import decode
from shared.events.models import BY_NAME, IssueReported
from shared.privacy.residents import resident_id_only
from shared.store.eventstore import EventStore
from shared.store.grid_cache import GridCache as LruGridCache

from .context import AppContext
from .issues_api import json_response
from .security import Actor, Ctx, require_area, require_role
from .streams import slots_of

router = APIRouter(tags=["events"])
log = structlog.get_logger("needle.events")

QUEUE_MAX = 10_000  # events buffered per client before it gets the overflow event (read at each connect)
PING_S = 15.0  # a `: ping` comment line this often keeps proxies from closing an idle stream
SEND_TIMEOUT_S = 60.0  # a client that accepts no bytes for this long is dropped; it resumes with Last-Event-ID
BATCH_BYTES = 64 * 1024  # events already waiting are sent in one write up to about this size
GRID_CACHE_MAX = 50_000  # issue -> grid entries kept for the area filter
MAX_STREAMS = 5_000  # open streams per process; more get 503
_IDLE_CHECK_S = 5.0  # how often an idle stream checks that NATS is still connected and its token not revoked


# -- schemas ---------------------------------------------------------------------------------------
@cache
def _schema_text(ce_type: str) -> str | None:
    s = schemas.schema_for(ce_type)
    return schemas.dumps(s) if s is not None else None


@router.get("/v1/schemas", summary="Index of the event JSON Schemas (public)")
async def list_schemas(request: Request) -> Response:
    """Every CloudEvents ``type`` needle writes, mapped to the URL of its JSON Schema."""
    body = {t: str(request.url_for("get_event_schema", ce_type=t)) for t in sorted(schemas.all_schemas())}
    return json_response(body, headers={"Cache-Control": "public, max-age=300"})


@router.get("/v1/schemas/{ce_type}", name="get_event_schema", summary="JSON Schema of one event type (public)",
            response_class=Response, responses={200: {"content": {schemas.SCHEMA_MEDIA_TYPE: {}}}})
async def get_event_schema(ce_type: str) -> Response:
    """The CloudEvents envelope schema of one type, e.g. ``needle.issue.reported.v1`` (``.json`` optional)."""
    text = _schema_text(ce_type.removesuffix(".json"))
    if text is None:
        raise NotFound(f"no schema for event type {ce_type!r}; GET /v1/schemas lists them", field="type")
    return Response(text, media_type=schemas.SCHEMA_MEDIA_TYPE, headers={"Cache-Control": "public, max-age=300"})


# -- the stream ------------------------------------------------------------------------------------
class GridCache(LruGridCache):
    """The shared issue -> grid cache, filled from the store on a miss."""

    def __init__(self, size: int = GRID_CACHE_MAX) -> None:
        super().__init__(size)

    async def lookup(self, store: EventStore, issue_id: str) -> str | None:
        grid = self.get(issue_id)
        if grid is None:
            with contextlib.suppress(Exception):  # unreadable history: the event is left out, never guessed in
                for env in await store.load(issue_id):
                    if isinstance(env.data, IssueReported):
                        grid = env.data.grid
                        self.put(issue_id, grid)
                        break
        return grid


class Hub:
    """Per-app state of the stream: the grid cache and the number of open streams."""

    def __init__(self) -> None:
        self.grids = GridCache()
        self.open = 0


def _hub(request: Request) -> Hub:
    hub: Hub | None = getattr(request.app.state, "event_hub", None)
    if hub is None:
        hub = request.app.state.event_hub = Hub()
    return hub


def _nats(ctx: AppContext) -> NATS:
    nc = ctx.nc
    if nc is None or nc.is_closed:
        raise Unavailable("the event stream is not available (no NATS connection)")
    return nc


def parse_types(types: str | None) -> list[str]:
    names = list(dict.fromkeys(t.strip() for t in (types or "").split(",") if t.strip()))
    for n in names:
        if n not in BY_NAME:
            raise Invalid(f"unknown event type {n!r} (known: {', '.join(BY_NAME)})", field="types")
    return names


def filter_subjects(names: list[str], area: str | None) -> list[str]:
    """Event names -> JetStream filter subjects; rulebook and resident events belong to no area."""
    if not names:
        return [sj.ISSUE_EVENTS] if area else [sj.ALL_EVENTS]
    out = [sj.filter_of_type(n) for n in names if not (area and n in sj.NON_ISSUE_EVENTS)]
    if not out:
        raise Invalid("rulebook and resident events belong to no area: drop `area` or add issue event types",
                      field="types")
    return out


def parse_last_id(header: str | None, query: str | None) -> int | None:
    raw = header if header is not None else query  # the header wins: browsers send it on reconnect
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    # ASCII digits only ("²".isdigit() is True and int() refuses it), and no longer than a stream sequence can be
    # (int() refuses more than 4300 digits; JetStream sequences are uint64): 422, never a 500
    if not (text.isascii() and text.isdigit() and len(text) <= 20 and int(text) < 2**64):
        raise Invalid("Last-Event-ID must be a stream sequence (a non-negative integer)", field="Last-Event-ID")
    return int(text)


def _frame(seq: int, ce_type: str, data: bytes) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, ce_type.encode(), data)


class StreamClient:
    """One SSE client: its ordered consumer, its bounded queue and what it was last sent."""

    def __init__(self, nc: NATS, store: EventStore, org: Any, grids: GridCache, *, area: str | None,
                 after: int, queue_max: int, revoked: Callable[[], bool] = lambda: False,
                 expires_at: float = float("inf")) -> None:
        self.nc, self.store, self.org, self.grids, self.area = nc, store, org, grids, area
        self.revoked = revoked  # the client's token was revoked: the stream ends (a reconnect gets 401)
        self.expires_at = expires_at  # the client's token expires (epoch seconds): the stream ends then
        self.queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(maxsize=max(1, queue_max))
        self.last_queued = after  # highest sequence taken from the consumer (dedupes replays after a reset)
        self.delivered = after  # highest sequence handed to the client's connection
        self.overflowed = False
        self.closed = False
        self.sub: Any = None
        self._stopper: asyncio.Task[None] | None = None

    async def start(self, subjects: list[str]) -> None:
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.last_queued + 1,
                             inactive_threshold=30.0)
        if len(subjects) > 1:
            cfg.filter_subjects = subjects
        self.sub = await self.nc.jetstream().subscribe(
            subjects[0], stream=sj.EVENTS_STREAM, cb=self._on_msg, ordered_consumer=True, config=cfg,
            pending_bytes_limit=32 * 1024 * 1024)

    async def _on_msg(self, msg: Msg) -> None:
        if self.closed:
            return
        seq = msg.metadata.sequence.stream
        if seq <= self.last_queued:
            return
        data = msg.data
        try:
            ce = orjson.loads(data)
        except orjson.JSONDecodeError:  # not a CloudEvent: nothing an integrator could read
            log.error("non-JSON message in the event stream skipped", seq=seq, subject=msg.subject)
            self.last_queued = seq
            return
        if self.area is not None:
            inside = await self._in_area(msg.subject, ce)
            if self.closed:
                return
            if not inside:
                self.last_queued = seq
                return
        if "sealed" in ce and self.store.texts is not None:  # the issue's free text, opened for the reader
            try:
                opened = await self.store.texts.open_one(decode(data, seq))
            except (ValueError, Unavailable) as exc:  # a newer type, or keys down: sent as stored, sealed
                log.warning("sealed event sent sealed", seq=seq, error=str(exc))
            else:
                ce = opened.to_cloudevent()
                ce.pop("sequence", None)
                data = b""
        if not data:
            resident_id_only(ce)
            data = orjson.dumps(ce)
        elif (b'"resident":{' in data and resident_id_only(ce)) or b"\n" in data or b"\r" in data:
            data = orjson.dumps(ce)  # SSE data must be one line; a reported resident goes out as {id} only
        try:
            self.queue.put_nowait((seq, _frame(seq, str(ce.get("type", "")), data)))
        except asyncio.QueueFull:
            self._overflow()
            return
        self.last_queued = seq

    async def _in_area(self, subject: str, ce: dict[str, Any]) -> bool:
        try:
            issue_id, name = sj.parse_issue_subject(subject)
        except ValueError:
            return False
        grid = None
        if name == IssueReported.name:
            grid = (ce.get("data") or {}).get("grid")
            if isinstance(grid, str):
                self.grids.put(issue_id, grid)
        if not isinstance(grid, str):
            grid = await self.grids.lookup(self.store, issue_id)
        return grid is not None and bool(self.org.is_under(grid, self.area))

    def _overflow(self) -> None:
        """The client fell QUEUE_MAX behind: drop what it was not sent, stop consuming, say so last."""
        self.overflowed = self.closed = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)
        self._stopper = asyncio.create_task(self._stop_consumer())

    def _over(self) -> bool:
        return self.revoked() or time.time() >= self.expires_at

    async def _next(self) -> tuple[int, bytes] | None:
        if self._over():
            return None
        if not self.queue.empty():
            return self.queue.get_nowait()
        while True:
            wait = min(_IDLE_CHECK_S, max(0.0, self.expires_at - time.time()) + 0.01)
            try:
                return await asyncio.wait_for(self.queue.get(), wait)
            except TimeoutError:
                if self.nc.is_closed or self.nc.is_draining or self._over():
                    return None

    async def frames(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._next()
            if item is None:
                break
            last, first = item
            parts, size, end = [first], len(first), False
            while size < BATCH_BYTES and not self.queue.empty():
                nxt = self.queue.get_nowait()
                if nxt is None:
                    end = True
                    break
                parts.append(nxt[1])
                size += len(nxt[1])
                last = nxt[0]
            yield b"".join(parts)
            self.delivered = last  # the write returned: the client's connection has it
            if end:
                break
        if self.overflowed:
            body = orjson.dumps({"last_event_id": str(self.delivered),
                                 "reason": "the client read too slowly; reconnect with Last-Event-ID"})
            yield b"id: %d\nevent: %s\ndata: %s\n\n" % (self.delivered, schemas.OVERFLOW_EVENT.encode(), body)

    async def _stop_consumer(self) -> None:
        sub, self.sub = self.sub, None
        if sub is None:
            return
        consumer = getattr(sub, "_consumer", None)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if consumer and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.jetstream().delete_consumer(sj.EVENTS_STREAM, consumer)

    async def close(self) -> None:
        self.closed = True
        if self._stopper is not None:
            with contextlib.suppress(Exception):
                await self._stopper
        await self._stop_consumer()


class _StreamResponse(EventSourceResponse):
    """An EventSourceResponse that always releases its client's consumer, however the stream ends."""

    def __init__(self, client: StreamClient, hub: Hub, release: Callable[[], None]) -> None:
        super().__init__(client.frames(), ping=PING_S, send_timeout=SEND_TIMEOUT_S)
        self._client, self._hub, self._release = client, hub, release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._hub.open -= 1
            self._release()
            with anyio.move_on_after(5, shield=True):
                await self._client.close()


@router.get("/v1/events/stream", summary="Every event as Server-Sent Events (integrator, admin, supervisor)",
            response_class=Response, responses={200: {"content": {"text/event-stream": {}}}})
async def event_stream(request: Request, ctx: Ctx, p: Actor,
                       types: Annotated[str | None, Query(description="event names, e.g. issue_reported,"
                                                                       "task_dispatched")] = None,
                       area: Annotated[str | None, Query(description="only issues whose grid is under it")] = None,
                       last_event_id: Annotated[str | None, Query(description="as the Last-Event-ID header")] = None,
                       live: Annotated[bool, Query(description="without Last-Event-ID: only new events")] = False,
                       last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None
                       ) -> Response:
    """CloudEvents as SSE: ``id`` = stream sequence, ``event`` = CloudEvents type, ``data`` = the CloudEvent.

    Starts after ``Last-Event-ID`` (header or ``?last_event_id=``), else at the first event (``live=true``:
    at the next one). Supervisors see only their area. A ``needle.stream.overflow`` event ends the stream of
    a client that reads too slowly: reconnect with the Last-Event-ID it names."""
    require_role(p, "integrator", "supervisor")
    if area is not None and area not in ctx.org.areas:
        raise Invalid(f"unknown area {area!r}", field="area")
    if p.role == "supervisor":
        area = area or p.scope_id
        require_area(ctx.org, p, area, f"area {area}")
    names = parse_types(types)
    subjects = filter_subjects(names, area)
    after = parse_last_id(last_event_id_header, last_event_id)
    hub = _hub(request)
    if hub.open >= MAX_STREAMS:
        raise Unavailable(f"too many open event streams ({MAX_STREAMS}); retry later")
    nc = _nats(ctx)
    slots = slots_of(request, ctx.settings.sse_max_per_subject)
    slots.take(p.subject)  # 429 beyond NEEDLE_SSE_MAX_PER_SUBJECT streams of this subject (dashboard's included)
    try:
        if after is None:
            after = (await nc.jetstream().stream_info(sj.EVENTS_STREAM)).state.last_seq if live else 0
        client = StreamClient(nc, ctx.store, ctx.org, hub.grids, area=area, after=after, queue_max=QUEUE_MAX,
                              revoked=lambda: ctx.verifier.is_revoked(p), expires_at=p.expires_at)
        await client.start(subjects)
    except Exception as exc:
        slots.give(p.subject)
        raise Unavailable(f"could not open the event stream: {exc!r}") from exc
    hub.open += 1
    return _StreamResponse(client, hub, lambda: slots.give(p.subject))
