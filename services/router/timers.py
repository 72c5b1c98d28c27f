"""The router's SLA timers: one JetStream message schedule per dispatch in NEEDLE_TIMERS, fired timers held
until their edge and handled in batches (``fire_issues``), and the bounded cache of the issue states the router
wrote. A mixin of ``Router`` (services/router/service.py), which provides the store, the rules and the consumers.
"""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from shared.commanding import load_state, utcnow
from shared.domain.errors import ConcurrencyConflict, DomainError, Unavailable
from shared.domain.ids import issue_of_task
from shared.domain.issue import IssueState, evolve
from shared.events import subjects as sj
from shared.events.models import TaskDispatched
from shared.store.eventstore import AppendRequest, JetStreamEventStore

from .reactions import (
    RouterRules,
    dispatch_timer,
    is_review_key,
    latest_dispatch_timer,
    on_issue_timer,
    progress_every,
    review_timer,
)

log = structlog.get_logger("needle.router")
SOURCE = "needle/router"
EARLY = timedelta(seconds=2)  # schedules fire up to ~1.3 s late on a 1 s grain: set them early, wait the rest
MAX_WAIT = 10.0
STALE_RELOADS = 20  # ~10 s of reloads of a replica that is behind before a cue or timer is nak'ed
STALE_BACKOFF_S = 0.05


class StateCache:
    """The issue states this router last wrote, most recent kept (bounded). A cached state may be behind
    the stream (a handler acted since), never ahead: every decision made from it is appended under OCC
    against its sequence, so a stale entry costs one refused append and a reload, never a wrong event."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._states: OrderedDict[str, IssueState] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, issue_id: str) -> IssueState | None:
        st = self._states.get(issue_id)
        if st is None:
            self.misses += 1
            return None
        self.hits += 1
        self._states.move_to_end(issue_id)
        return st

    def put(self, state: IssueState) -> None:
        self._states[state.id] = state
        self._states.move_to_end(state.id)
        while len(self._states) > self.size:
            self._states.popitem(last=False)

    def peek(self, issue_id: str) -> IssueState | None:
        """The cached state, if any, without counting a hit or a miss."""
        return self._states.get(issue_id)

    def drop(self, issue_id: str) -> None:
        self._states.pop(issue_id, None)


class TimerMixin:
    store: JetStreamEventStore
    js: JetStreamContext
    rules: RouterRules
    sem: asyncio.Semaphore
    states: StateCache
    timers_set: OrderedDict[str, int]
    processed: int
    batch: int

    async def schedule(self, issue_id: str, key: str, at: datetime, trace: str | None = None) -> None:
        """The pending timer of the dispatch whose first task is ``key``, for its next clock edge (a new
        schedule replaces the pending one on its subject). ``trace``: the trace id of the flow that dispatched
        it, carried by the SLA events the timer causes."""
        fire = datetime.fromtimestamp(math.floor((at - EARLY).timestamp()), UTC)
        body: dict[str, str] = {"issue": issue_id, "task": key, "at": at.isoformat()}
        if trace:
            body["trace"] = trace
        await self.js.publish(
            sj.timer_schedule(key), orjson.dumps(body),
            headers={"Nats-Schedule": f"@at {fire.strftime('%Y-%m-%dT%H:%M:%SZ')}",
                     "Nats-Schedule-Target": sj.timer_fired(key)})

    async def schedule_from(self, state: IssueState, keys: Iterable[str] = (), trace: str | None = None) -> None:
        """Set the timers of the issue's latest dispatch and of the dispatches of ``keys`` (fired timers) from a
        state this router wrote or read, and remember it: the task_dispatched events up to that state then need
        no schedule of their own (a router that restarted, or another one, does not remember and sets it again
        from the event: the same timer)."""
        progress = progress_every(self.rules, state)
        timers = {t[0]: t[1] for t in (latest_dispatch_timer(state, progress), review_timer(state),
                                        *(dispatch_timer(state, k, progress) for k in keys if not is_review_key(k)))
                  if t is not None}
        await asyncio.gather(*(self.schedule(state.id, key, at, trace) for key, at in timers.items()))
        self.timers_set[state.id] = state.last_seq
        self.timers_set.move_to_end(state.id)
        while len(self.timers_set) > self.states.size:
            self.timers_set.popitem(last=False)

    def timer_for_dispatch(self, issue_id: str, seq: int, d: TaskDispatched) -> tuple[str, datetime] | None:
        """The timer of the dispatch whose lead's task_dispatched is stored at ``seq``: from the state this
        router holds when it has seen that far, else from the event (the tasks of a dispatch share deadlines)."""
        cached = self.states.peek(issue_id)
        if cached is not None and cached.last_seq >= seq:
            return dispatch_timer(cached, d.task_id, progress_every(self.rules, cached))
        edges = [d.acknowledge_warn, d.resolve_warn, d.acknowledge_due, d.resolve_due]
        book = self.rules.rulebook  # the category is not in the event: the shortest progress period (early is fine)
        periods = [r.progress_every for r in (book.dispatch, *book.dispatch_by_category.values()) if r.progress_every]
        if periods and d.role == "lead":
            edges.append(d.dispatched_at + min(periods))
        return d.task_id, min(edges)

    @staticmethod
    def timer_of(msg: Msg) -> tuple[str, str, float, str | None]:
        """(issue id, the dispatch's first task, edge as a timestamp, trace id) of a fired timer. Timers of
        earlier versions were per task (co-tasks too): handled as their dispatch's."""
        body = orjson.loads(msg.data)
        task: str = body["task"]
        return (body.get("issue") or issue_of_task(task), task, datetime.fromisoformat(body["at"]).timestamp(),
                body.get("trace"))

    async def fire_issues(self, fired: dict[str, set[str]], traces: dict[str, str | None] | None = None
                          ) -> dict[str, BaseException]:
        """Fired timers (issue -> the dispatches they are for): load the states (cached, else direct gets in
        flight together), decide purely, append every issue's reactions in ONE multi-issue atomic batch (each
        issue OCC-guarded), then set the next timers (of the fired dispatches and of each issue's latest one).
        A refused batch (some issue changed meanwhile) is decided again on fresh states, then issue by issue.
        Returns the issues that failed, with their error (their timers come back). ``traces``: each issue's
        trace id (the flow that dispatched it), carried by the events and the next timers."""
        traces = traces or {}
        failed: dict[str, BaseException] = {}
        after: dict[str, IssueState] = {}
        refused = await self._fire_together(list(fired), fired, traces, after, failed, fresh=False)
        if refused:
            refused = await self._fire_together(refused, fired, traces, after, failed, fresh=True)
        singles = await asyncio.gather(*(self.fire_one(i, traces.get(i), fired.get(i, ())) for i in refused),
                                       return_exceptions=True)
        for issue_id, one in zip(refused, singles, strict=True):
            if isinstance(one, BaseException):
                failed[issue_id] = one
            else:
                after[issue_id] = one

        scheduled = await asyncio.gather(*(self.schedule_from(st, fired[i], traces.get(i)) for i, st in after.items()),
                                         return_exceptions=True)
        for issue_id, outcome in zip(after, scheduled, strict=True):
            if isinstance(outcome, BaseException):
                failed[issue_id] = outcome
        return failed

    async def _fire_together(self, issue_ids: list[str], fired: dict[str, set[str]], traces: dict[str, str | None],
                             after: dict[str, IssueState], failed: dict[str, BaseException], *,
                             fresh: bool) -> list[str]:
        """One round of ``fire_issues``: fills ``after`` (state once handled) and ``failed``; returns the
        issues of refused batches."""
        async def state_of(issue_id: str) -> IssueState:
            cached = None if fresh else self.states.get(issue_id)
            if cached is not None and _holds(cached, fired.get(issue_id, ())):
                return cached
            return await self.load_with_tasks(issue_id, fired.get(issue_id, ()))

        loaded = await asyncio.gather(*(state_of(i) for i in issue_ids), return_exceptions=True)
        now = utcnow()
        pending: list[tuple[IssueState, AppendRequest]] = []
        for issue_id, st in zip(issue_ids, loaded, strict=True):
            if isinstance(st, BaseException):
                failed[issue_id] = st
            elif events := on_issue_timer(st, self.rules, now):
                pending.append((st, AppendRequest(issue_id, tuple(events), st.last_seq, st.version, "router",
                                                  correlation=traces.get(issue_id))))
            else:
                after[issue_id] = st
        refused: list[str] = []
        for chunk in _chunks(pending, 900):
            try:
                results = await self.store.append_many([r for _, r in chunk], now=now, source=SOURCE)
            except DomainError as exc:
                log.debug("batched timer append refused", error=str(exc), issues=len(chunk), fresh=fresh)
                for _, r in chunk:
                    self.states.drop(r.issue_id)
                    refused.append(r.issue_id)
                continue
            for (st, req), res in zip(chunk, results, strict=True):
                after[req.issue_id] = _after(st, res.envelopes)
                self.states.put(after[req.issue_id])
                log.info("sla", issue=req.issue_id, trace_id=req.correlation, events=[e.name for e in req.events])
        return refused

    async def load_with_tasks(self, issue_id: str, tasks: Iterable[str] = ()) -> IssueState:
        """The issue's state from the stream, holding the fired dispatches' tasks. A timer is scheduled only
        after its dispatch is stored, so a history without the task is a stale one (see ``load_holding``)."""
        wanted = tuple(tasks)
        return await load_holding(self.store, issue_id, lambda state: _holds(state, wanted),
                                  "the timer's dispatch", guard=self.sem)

    async def fire_one(self, issue_id: str, trace: str | None = None, tasks: Iterable[str] = ()) -> IssueState:
        """One issue's fired timer on a fresh state, reloaded after each conflict."""
        for _ in range(5):
            state = await self.load_with_tasks(issue_id, tasks)
            now = utcnow()
            events = on_issue_timer(state, self.rules, now)
            if not events:
                return state
            try:
                res = await self.store.append(issue_id, events, expected_last_seq=state.last_seq,
                                              version=state.version, now=now, actor="router", source=SOURCE,
                                              correlation=trace)
            except ConcurrencyConflict:
                continue
            state = _after(state, res.envelopes)
            self.states.put(state)
            log.info("sla", issue=issue_id, trace_id=trace, events=[e.name for e in events])
            return state
        raise ConcurrencyConflict(f"issue {issue_id}: timer not handled after 5 conflicts")

    async def run_timers(self, sub: Any, inflight: int = 20_000, batch: int = 1000) -> None:
        """Fired timers are fetched ahead (schedules fire up to ~2 s before their edge) and held, without any
        resource, in a heap by edge time; whatever is due is taken in batches of up to ``batch`` issues
        (``fire_issues``), and each message is acked only once its issue's reactions and next timer are
        stored. Up to ``inflight`` fired timers may be held; fetching goes on meanwhile."""
        room = asyncio.Semaphore(inflight)
        held: list[tuple[float, int, str, str, str | None, Msg]] = []
        order = itertools.count()
        wake = asyncio.Event()

        async def fetch() -> None:
            while True:
                try:
                    msgs = await sub.fetch(self.batch, timeout=1)
                except Exception as exc:
                    if "Timeout" not in type(exc).__name__:
                        log.warning("fetch failed", error=repr(exc))
                        await asyncio.sleep(0.5)
                    continue
                for m in msgs:
                    try:
                        issue_id, key, at, trace = self.timer_of(m)
                    except (ValueError, KeyError, DomainError) as exc:
                        log.warning("unprocessable timer terminated", subject=m.subject, error=str(exc))
                        await m.term()
                        continue
                    await room.acquire()
                    heapq.heappush(held, (at, next(order), issue_id, key, trace, m))
                wake.set()

        fetcher = asyncio.create_task(fetch())
        try:
            while True:
                if fetcher.done():
                    fetcher.result()
                now = time.time()
                due: dict[str, list[tuple[str, str | None, Msg]]] = defaultdict(list)
                while held and held[0][0] <= now and len(due) < batch:
                    _, _, issue_id, key, trace, m = heapq.heappop(held)
                    due[issue_id].append((key, trace, m))
                if due:
                    try:
                        await self._fire_and_ack(due)
                    finally:
                        for _ in range(sum(map(len, due.values()))):
                            room.release()
                    continue
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(held[0][0] - now, MAX_WAIT) if held else MAX_WAIT)
        finally:
            fetcher.cancel()

    async def _fire_and_ack(self, due: dict[str, list[tuple[str, str | None, Msg]]]) -> None:
        try:
            failed = await self.fire_issues({issue_id: {key for key, _, _ in ms} for issue_id, ms in due.items()},
                                            {issue_id: next((t for _, t, _ in ms if t), None)
                                             for issue_id, ms in due.items()})
        except Exception as batch_error:  # nothing stored for sure: every timer of the batch comes back
            log.exception("timer batch failed; will retry")
            failed = dict.fromkeys(due, batch_error)
        for issue_id, error in failed.items():
            log.warning("timer failed; will retry", issue=issue_id, error=repr(error))
        acks = [m.nak(delay=1) if issue_id in failed else m.ack() for issue_id, ms in due.items() for _, _, m in ms]
        await asyncio.gather(*acks, return_exceptions=True)
        self.processed += sum(len(ms) for issue_id, ms in due.items() if issue_id not in failed)


async def load_holding(store: Any, issue_id: str, holds: Callable[[IssueState], bool], missing: str,
                       guard: contextlib.AbstractAsyncContextManager[Any] | None = None) -> IssueState:
    """The issue's state once ``holds`` it. On an R3 stream a direct get may be answered by a replica that has
    not applied the latest events (a node just restarted): deciding on that stale history would do nothing and
    ack the cue or timer (found by the fault suite: an issue reported while a node caught up was never
    routed). Read again with backoff; Unavailable (retryable: nak'ed, redelivered) if it never holds."""
    for attempt in range(STALE_RELOADS):
        async with guard or contextlib.nullcontext():
            state, _ = await load_state(store, issue_id)
        if holds(state):
            return state
        await asyncio.sleep(STALE_BACKOFF_S * (attempt + 1))
    raise Unavailable(f"issue {issue_id}: the event store answered without {missing}; retry later")


def _holds(state: IssueState, tasks: Iterable[str]) -> bool:
    """The state holds the fired timers' dispatches (and, for the review clock's, the report)."""
    have = {t.id for t in state.tasks}
    return all(state.exists if is_review_key(t) else t in have for t in tasks)


def _chunks(items: list[tuple[IssueState, AppendRequest]], max_events: int) -> list[list[tuple[IssueState,
                                                                                             AppendRequest]]]:
    """Consecutive runs of ``items`` of at most ``max_events`` events each (an atomic batch holds 1,000)."""
    out: list[list[tuple[IssueState, AppendRequest]]] = []
    size = max_events
    for item in items:
        n = len(item[1].events)
        if size + n > max_events:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


def _after(state: IssueState, envs: tuple[Any, ...]) -> IssueState:
    for e in envs:
        state = evolve(state, e.data, e.seq)
    return state
