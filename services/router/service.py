"""The router process: durable JetStream consumers that apply the pure reactions.

* ``router`` consumes every issue event; reactions (routing, escalation, fallback) are
  appended with OCC and marked ``caused_by`` the cue, so a redelivery or a second router
  changes nothing. Several router processes bind the same durable consumer to share work.
* Dispatched tasks get a durable timer: a JetStream message schedule in NEEDLE_TIMERS, one
  pending per task, always for its next clock edge. It is set a little before the edge and
  the router waits out the rest itself, so lag is not bound to the scheduler's 1 s grain.
  A fired timer re-checks the issue, warns or breaches (and escalates), then sets the next.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
from collections import OrderedDict, defaultdict
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from shared.commanding import load_state, utcnow
from shared.domain.calendar import WorkCalendar, load_holiday_file
from shared.domain.errors import ConcurrencyConflict, DomainError, Unavailable
from shared.domain.ids import issue_of_task
from shared.domain.issue import IssueState, evolve, initial_state
from shared.events import subjects as sj
from shared.events.codec import Envelope, UnknownEventType, decode
from shared.events.models import IssueReported, TaskDispatched
from shared.store.eventstore import AppendRequest, JetStreamEventStore

from .clocks import SlaClocks
from .reactions import RouterRules, next_edge, on_timer, react

if TYPE_CHECKING:
    from shared.runtime.stack import Stack

log = structlog.get_logger("needle.router")
REACTS_TO = frozenset({"issue_reported", "task_returned", "issue_escalated", "issue_reopened"})
CONSUMES = REACTS_TO | {"task_dispatched"}  # the router's consumer sees only these types
SOURCE = "needle/router"
EARLY = timedelta(seconds=2)  # schedules fire up to ~1.3 s late on a 1 s grain: set them early, wait the rest
MAX_WAIT = 10.0


class StateCache:
    """The issue states this router last wrote, most recent kept (bounded). A cached state may be behind
    the stream (a handler acted since), never ahead: every decision made from it is appended under OCC
    against its sequence, so a stale entry costs one refused append and a reload, never a wrong event."""

    def __init__(self, size: int = 50_000) -> None:
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

    def drop(self, issue_id: str) -> None:
        self._states.pop(issue_id, None)


STALE_RELOADS = 20  # ~10 s of reloads before a cue is nak'ed
STALE_BACKOFF_S = 0.05


class Router:
    def __init__(self, store: JetStreamEventStore, js: JetStreamContext, rules: RouterRules, *,
                 batch: int = 256, concurrency: int = 64) -> None:
        self.store = store
        self.js = js
        self.rules = rules
        self.batch = batch
        self.sem = asyncio.Semaphore(concurrency)
        self.processed = 0
        self.states = StateCache()

    # -- reacting to events ------------------------------------------------------------------------------------
    async def handle_event(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        issue_id, name = sj.parse_issue_subject(msg.subject)
        if name == "task_dispatched":
            env = decode(msg.data, seq)
            assert isinstance(env.data, TaskDispatched)
            d = env.data
            at = min(d.acknowledge_warn, d.resolve_warn, d.acknowledge_due, d.resolve_due)
            await self.schedule(d.task_id, at, env.correlationid)
            return
        if name not in REACTS_TO:
            return
        env = decode(msg.data, seq)
        with structlog.contextvars.bound_contextvars(trace_id=env.correlationid, issue=issue_id):
            await self._react(issue_id, name, env, seq)

    async def _react(self, issue_id: str, name: str, env: Envelope, seq: int) -> None:
        for _ in range(5):
            state = await self.load_including(issue_id, seq)
            now = utcnow()
            events = react(state, env.data, seq, self.rules, now)
            if not events:
                return
            try:
                res = await self.store.append(issue_id, events, expected_last_seq=state.last_seq,
                                              version=state.version, now=now, actor="router",
                                              msg_id=f"route:{issue_id}:{seq}", causation=env.id, source=SOURCE,
                                              correlation=env.correlationid)
                self.states.put(_after(state, res.envelopes))
                log.info("reacted", cue=name, seq=seq, events=[e.name for e in events])
                return
            except ConcurrencyConflict:
                continue
        raise ConcurrencyConflict(f"issue {issue_id}: could not react to seq {seq}")

    async def load_including(self, issue_id: str, seq: int) -> IssueState:
        """The issue's state with the event at ``seq`` (the cue being handled) folded in. On an R3
        stream a direct get may be answered by a replica that has not applied that event yet (a node
        just restarted): the history it returns is stale, and reacting to it would do nothing and ack
        the cue (found by the fault suite: an issue reported while a node caught up was never routed).
        Reload until the cue is there; Unavailable (nak, redelivered) if it never shows."""
        for attempt in range(STALE_RELOADS):
            state, _ = await load_state(self.store, issue_id)
            if state.last_seq >= seq:
                return state
            await asyncio.sleep(STALE_BACKOFF_S * (attempt + 1))
        raise Unavailable(f"issue {issue_id}: the event store answered without seq {seq}; retry later")

    # -- timers ------------------------------------------------------------------------------------------------
    async def schedule(self, task_id: str, at: datetime, trace: str | None = None) -> None:
        fire = datetime.fromtimestamp(math.floor((at - EARLY).timestamp()), UTC)
        body: dict[str, str] = {"task": task_id, "at": at.isoformat()}
        if trace:  # the trace id of the flow that dispatched the task: the SLA events carry it too
            body["trace"] = trace
        await self.js.publish(
            sj.timer_schedule(task_id), orjson.dumps(body),
            headers={"Nats-Schedule": f"@at {fire.strftime('%Y-%m-%dT%H:%M:%SZ')}",
                     "Nats-Schedule-Target": sj.timer_fired(task_id)})

    @staticmethod
    async def until_edge(msg: Msg) -> None:
        """Wait out the last moments before the edge (schedules are set early). Holds no resource."""
        with contextlib.suppress(Exception):
            at = datetime.fromisoformat(orjson.loads(msg.data)["at"])
            wait = (at - utcnow()).total_seconds()
            if 0 < wait <= MAX_WAIT:
                await asyncio.sleep(wait)

    async def handle_timer(self, msg: Msg) -> None:
        body = orjson.loads(msg.data)
        task_id: str = body["task"]
        trace: str | None = body.get("trace")
        issue_id = issue_of_task(task_id)
        with structlog.contextvars.bound_contextvars(trace_id=trace, issue=issue_id):
            await self._on_timer(issue_id, task_id, trace)

    async def _on_timer(self, issue_id: str, task_id: str, trace: str | None) -> None:
        for attempt in range(5):
            cached = self.states.get(issue_id) if attempt == 0 else None
            if cached is not None and any(t.id == task_id for t in cached.tasks):
                state = cached
            else:
                state, _ = await load_state(self.store, issue_id)
                if not any(t.id == task_id for t in state.tasks):
                    # a timer is scheduled after its task's dispatch is stored: a history without the
                    # task comes from a replica that is behind (see load_including)
                    await asyncio.sleep(0.05 * (attempt + 1))
                    continue
            now = utcnow()
            events = on_timer(state, task_id, self.rules, now)
            if events:
                try:
                    res = await self.store.append(issue_id, events, expected_last_seq=state.last_seq,
                                                  version=state.version, now=now, actor="router", source=SOURCE,
                                                  correlation=trace)
                except ConcurrencyConflict:
                    self.states.drop(issue_id)
                    continue
                for e in res.envelopes:
                    state = evolve(state, e.data, e.seq)
                self.states.put(state)
                log.info("sla", task=task_id, events=[e.name for e in events])
            try:
                nxt = next_edge(state.task(task_id))
            except DomainError:
                nxt = None
            if nxt is not None:
                await self.schedule(task_id, nxt[0], trace)
            return
        raise Unavailable(f"timer of task {task_id}: no current state of issue {issue_id} after 5 tries; retry later")

    # -- consumer loops ----------------------------------------------------------------------------------------
    async def _one(self, msg: Msg, handler: Any) -> None:
        async with self.sem:
            try:
                await handler(msg)
                await msg.ack()
                self.processed += 1
            except (UnknownEventType, ValueError) as exc:
                log.warning("unprocessable message terminated", subject=msg.subject, error=str(exc))
                await msg.term()
            except DomainError as exc:
                if exc.retryable:
                    await msg.nak(delay=1)
                else:
                    log.warning("message refused by the domain", subject=msg.subject, error=str(exc))
                    await msg.term()
            except Exception:
                log.exception("router failed on a message; will retry", subject=msg.subject)
                await msg.nak(delay=2)

    async def run_consumer(self, sub: Any, handler: Any, *, per_issue: bool) -> None:
        while True:
            try:
                msgs = await sub.fetch(self.batch, timeout=1)
            except TimeoutError:
                continue
            except Exception as exc:  # nats-py raises its own TimeoutError subclass too
                if "Timeout" in type(exc).__name__:
                    continue
                log.warning("fetch failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            if per_issue:
                await self.react_to_batch(msgs, handler)
            else:
                await asyncio.gather(*(self._one(m, handler) for m in msgs))

    async def run_timers(self, sub: Any, inflight: int = 20_000) -> None:
        """Timers are pipelined: each fired timer waits for its exact edge in a task of its own (no
        resource held), then takes a work slot; fetching goes on while up to ``inflight`` are waiting,
        so a burst of timers never holds up the next ones nor the routing of new reports."""
        room = asyncio.Semaphore(inflight)
        running: set[asyncio.Task[None]] = set()

        async def one(msg: Msg) -> None:
            try:
                await self.until_edge(msg)
                await self._one(msg, self.handle_timer)
            finally:
                room.release()

        while True:
            try:
                msgs = await sub.fetch(self.batch, timeout=1)
            except Exception as exc:
                if "Timeout" not in type(exc).__name__:
                    log.warning("fetch failed", error=repr(exc))
                    await asyncio.sleep(0.5)
                continue
            for m in msgs:
                await room.acquire()
                task = asyncio.create_task(one(m))
                running.add(task)
                task.add_done_callback(running.discard)

    async def react_to_batch(self, msgs: list[Msg], handler: Any) -> None:
        """The fast path: the reactions of every issue in a fetch go into ONE multi-issue atomic append
        (each issue OCC-guarded). Whatever does not fit it — an issue with several cues in the fetch, a
        conflict, an error — takes the one-message path, in order per issue."""
        groups: dict[str, list[Msg]] = defaultdict(list)
        for m in msgs:
            groups[m.subject.split(".")[3]].append(m)
        single = {issue: ms[0] for issue, ms in groups.items()
                  if len(ms) == 1 and ms[0].subject.rsplit(".", 1)[1] in REACTS_TO}
        done: set[str] = set()
        if len(single) > 1:
            done = await self._react_together(single)

        async def run_group(ms: list[Msg]) -> None:
            for m in ms:
                await self._one(m, handler)

        await asyncio.gather(*(run_group(g) for issue, g in groups.items() if issue not in done))

    async def _react_together(self, cues: dict[str, Msg]) -> set[str]:
        """Load, decide and append the reactions to one cue per issue at once; returns the issues done."""
        async def prepare(issue_id: str, msg: Msg) -> tuple[str, Msg, AppendRequest | None] | None:
            try:
                seq = msg.metadata.sequence.stream
                env = decode(msg.data, seq)
                if isinstance(env.data, IssueReported):
                    # a report is its issue's first event: fold it as delivered (no round trip); if more
                    # happened meanwhile, the OCC guard refuses the append and the slow path reloads
                    state = evolve(initial_state(issue_id), env.data, seq)
                else:
                    async with self.sem:
                        state = await self.load_including(issue_id, seq)
                events = react(state, env.data, seq, self.rules, utcnow())
                states[issue_id] = state
                req = AppendRequest(issue_id, tuple(events), state.last_seq, state.version, "router",
                                    causation=env.id, correlation=env.correlationid) if events else None
                return issue_id, msg, req
            except Exception:
                return None  # the one-message path will handle (and report) it

        states: dict[str, IssueState] = {}
        prepared = [p for p in await asyncio.gather(*(prepare(i, m) for i, m in cues.items())) if p is not None]
        done: set[str] = set()
        chunk: list[tuple[str, Msg, AppendRequest]] = []
        size = 0

        async def flush() -> None:
            nonlocal chunk, size
            if not chunk:
                return
            try:
                results = await self.store.append_many([r for _, _, r in chunk], now=utcnow(), source=SOURCE)
            except (ConcurrencyConflict, DomainError) as exc:
                log.debug("batched append refused; reacting one by one", error=str(exc), issues=len(chunk))
            else:
                for (_, m, req), res in zip(chunk, results, strict=True):
                    self.states.put(_after(states[req.issue_id], res.envelopes))
                    log.info("reacted", issue=req.issue_id, trace_id=req.correlation, cue=m.subject.rsplit(".", 1)[1],
                             seq=m.metadata.sequence.stream, events=[e.name for e in req.events])
                await asyncio.gather(*(m.ack() for _, m, _ in chunk))
                done.update(i for i, _, _ in chunk)
                self.processed += len(chunk)
            chunk, size = [], 0

        for issue_id, msg, req in prepared:
            if req is None:  # nothing to do for this cue
                await msg.ack()
                done.add(issue_id)
                continue
            if size + len(req.events) > 900:
                await flush()
            chunk.append((issue_id, msg, req))
            size += len(req.events)
        await flush()
        return done


def _after(state: IssueState, envs: tuple[Any, ...]) -> IssueState:
    for e in envs:
        state = evolve(state, e.data, e.seq)
    return state


async def start_router(stack: Stack) -> Router:
    assert stack.nc is not None and stack.store is not None
    js = stack.nc.jetstream()
    holidays = load_holiday_file(stack.settings.holidays) if stack.settings.holidays.exists() else None
    calendar = WorkCalendar(stack.rulebook.calendar, holidays)
    rules = RouterRules(org=stack.org, rulebook=stack.rulebook, clocks=SlaClocks(calendar))
    stack.extras["deadlines"] = rules.clocks
    router = Router(stack.store, js, rules)
    events_sub = await js.pull_subscribe(
        "", durable="router", stream=sj.EVENTS_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=30,
                              max_ack_pending=20_000, max_deliver=-1,
                              filter_subjects=[sj.events_of_type(t) for t in sorted(CONSUMES)]))
    timers_sub = await js.pull_subscribe(
        sj.TIMER_FIRED, durable="router-timers", stream=sj.TIMERS_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=60,
                              max_ack_pending=100_000, max_deliver=-1))
    stack.close_on_exit(events_sub)
    stack.close_on_exit(timers_sub)
    stack.spawn("router", router.run_consumer(events_sub, router.handle_event, per_issue=True))
    stack.spawn("router-timers", router.run_timers(timers_sub))
    stack.extras["router"] = router

    def hold(rb: Any) -> None:
        router.rules = replace(router.rules, rulebook=rb)

    stack.rule_holders.append(hold)
    return router
