"""The router process: durable JetStream consumers that apply the pure reactions.

* ``router`` consumes every issue event; reactions (routing, escalation, fallback) are
  appended with OCC and marked ``caused_by`` the cue, so a redelivery or a second router
  changes nothing. Several router processes bind the same durable consumer to share work.
* A dispatch (lead and co-tasks, same deadlines) has one durable timer: a JetStream message schedule in
  NEEDLE_TIMERS (work-queue retention: gone once handled), keyed by its lead task, always for the earliest
  edge over its open tasks; a dispatch supersedes the open tasks, so an issue has one live timer. It is set
  a little before the edge and the router holds the fired timer until the edge itself, so lag is not bound
  to the scheduler's 1 s grain. Due timers are handled in batches: the issues' states, the pure
  ``on_issue_timer``, one multi-issue atomic append, the next timers, then the acks. A fired timer
  re-checks the issue's state, so handling it twice changes nothing.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict, defaultdict
from dataclasses import replace
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from shared.commanding import load_current_state, utcnow
from shared.config import OrgTree, Rulebook
from shared.domain.clocks import SlaClocks
from shared.domain.errors import ConcurrencyConflict, DomainError
from shared.domain.issue import IssueState, evolve, initial_state
from shared.events import subjects as sj
from shared.events.codec import Envelope, UnknownEventType, decode
from shared.events.models import IssueMerged, IssueReported, TaskDispatched
from shared.lifecycle import Lifecycle
from shared.settings import Settings
from shared.store.eventstore import AppendRequest, JetStreamEventStore
from shared.store.settling import settled

from .reactions import (
    RouterRules,
    attach_duplicate,
    close_with_target,
    dispatch_timer,
    latest_dispatch_timer,
    react,
    review_key,
)
from .timers import SOURCE, StateCache, TimerMixin, _after, load_holding

log = structlog.get_logger("needle.router")
ACROSS = frozenset({"issue_merged", "issue_closed", "issue_closed_with_target"})  # 合并办理: other issues react
REACTS_TO = frozenset({"issue_reported", "task_returned", "issue_escalated", "issue_reopened", "issue_accepted",
                       "issue_recategorised", "return_approved"}) | ACROSS
RESCHEDULES = frozenset({"suspension_approved", "task_resumed", "task_reassigned", "return_approved",
                         "supervision_ordered", "clocks_resumed"})
"""Events that move a dispatch's clocks (or add a task) without a lead's task_dispatched: the timers are set
again from the state (the same schedule subject: a redelivery sets the same timer)."""
CONSUMES = REACTS_TO | RESCHEDULES | {"task_dispatched"}  # what the router handles; the rest is acked unread
# ONE wildcard filter, the types picked client-side: nats-server 2.15 intersects a multi-filter consumer's
# filters (``filter_subjects``) with every subject of the message block for each message it delivers, and
# every issue event has a subject of its own. With the five type filters the router's consumer cost the
# server ~90 % of its CPU and the router trailed at ~440 dispatches/s past 50,000 issues (perf profile,
# `needle bench timers --tasks 100000`); a single wildcard is a linear scan.
ROUTER_FILTER = f"{sj.EVENTS_ROOT}.issue.>"


class Router(TimerMixin):
    def __init__(self, store: JetStreamEventStore, js: JetStreamContext, rules: RouterRules, *,
                 batch: int = 256, concurrency: int = 64, cache_size: int = 10_000) -> None:
        self.store = store
        self.js = js
        self.rules = rules
        self.batch = batch
        self.sem = asyncio.Semaphore(concurrency)
        self.processed = 0
        self.states = StateCache(cache_size)
        self.timers_set: OrderedDict[str, int] = OrderedDict()  # issue -> the state's last seq its timer is from

    # -- reacting to events ------------------------------------------------------------------------------------
    async def _cue(self, data: bytes, seq: int) -> Envelope:
        """The event reacted to, its free text opened: a reaction may quote it (an escalation quotes the
        return's reason). A report's stays sealed: the router never writes it (and a report is the hot path)."""
        env = decode(data, seq)
        if env.sealed is not None and self.store.texts is not None and not isinstance(env.data, IssueReported):
            env = await self.store.texts.open_one(env)
        return env

    async def handle_event(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        issue_id, name = sj.parse_issue_subject(msg.subject)
        if name == "task_dispatched":
            env = decode(msg.data, seq)
            assert isinstance(env.data, TaskDispatched)
            if env.data.role != "lead" or self.timers_set.get(issue_id, 0) >= seq:
                return  # the lead's event sets its dispatch's timer, unless this router did when it appended
            timer = self.timer_for_dispatch(issue_id, seq, env.data)
            if timer is not None:
                await self.schedule(issue_id, *timer, env.correlationid)
            return
        if name in RESCHEDULES:
            env = decode(msg.data, seq)
            state = await self.load_including(issue_id, seq)
            cached = self.states.peek(issue_id)
            if cached is None or cached.last_seq <= state.last_seq:
                # a cached state from before a resume has no clock edge at all: a timer decided from it would
                # do nothing (no append, so no OCC to catch it) and set no next timer
                self.states.put(state)
            keys = [k for k in (getattr(env.data, "task_id", None), getattr(env.data, "to_task_id", None)) if k]
            await self.schedule_from(state, keys, env.correlationid)
            log.info("timers set again", cue=name, seq=seq, issue=issue_id, timers=[
                t for t in (latest_dispatch_timer(state), *(dispatch_timer(state, k) for k in keys)) if t])
        if name not in REACTS_TO:
            return
        env = await self._cue(msg.data, seq)
        if isinstance(env.data, IssueReported):
            await self.schedule_review(issue_id, env)
        if name in ACROSS:
            with structlog.contextvars.bound_contextvars(trace_id=env.correlationid, issue=issue_id):
                await self._react_across(issue_id, env, seq)
            return
        with structlog.contextvars.bound_contextvars(trace_id=env.correlationid, issue=issue_id):
            await self._react(issue_id, name, env, seq)

    async def schedule_review(self, issue_id: str, env: Envelope) -> None:
        """A report held for 受理 with a review clock: its timer, set before the report's cue is acked (a
        redelivered cue sets the same schedule again: one pending timer per subject)."""
        e = env.data
        if isinstance(e, IssueReported) and e.review and e.review_due is not None:
            first = min(x for x in (e.review_warn, e.review_due) if x is not None)
            await self.schedule(issue_id, review_key(issue_id), first, env.correlationid)

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

    async def _react_across(self, issue_id: str, env: Envelope, seq: int) -> None:
        """合并办理: a merge is attached to its target (or, the target closed meanwhile, the duplicate closes);
        a closing issue closes the duplicates attached to it. Each append is OCC-guarded and marked
        ``caused_by`` the cue, and each pure reaction answers nothing once done: exactly once."""
        e = env.data
        if isinstance(e, IssueMerged):
            target = await self._append_reaction(e.into, lambda t: attach_duplicate(t, issue_id, seq, utcnow()),
                                                 env, seq)
            if target.status == "closed":
                await self._append_reaction(issue_id, lambda d: close_with_target(d, target, seq, utcnow()), env, seq)
            return
        state = await self.load_including(issue_id, seq)
        if state.status != "closed" or not state.duplicates:
            return
        for dup in state.duplicates:
            await self._append_reaction(dup, lambda d: close_with_target(d, state, seq, utcnow()), env, seq)

    async def _append_reaction(self, issue_id: str, decide_: Any, env: Envelope, seq: int) -> IssueState:
        """Load ``issue_id``, append what ``decide_(state)`` answers (OCC, retried on conflicts); its state after."""
        for _ in range(5):
            state, _envs = await load_current_state(self.store, issue_id)
            events = decide_(state)
            if not events:
                return state
            try:
                res = await self.store.append(issue_id, events, expected_last_seq=state.last_seq,
                                              version=state.version, now=utcnow(), actor="router",
                                              msg_id=f"across:{issue_id}:{seq}", causation=env.id, source=SOURCE,
                                              correlation=env.correlationid)
            except ConcurrencyConflict:
                continue
            log.info("reacted", cue=env.data.name, seq=seq, on=issue_id, events=[x.name for x in events])
            return _after(state, res.envelopes)
        raise ConcurrencyConflict(f"issue {issue_id}: could not react to seq {seq}")

    async def load_including(self, issue_id: str, seq: int) -> IssueState:
        """The issue's state with the event at ``seq`` (the cue being handled) folded in."""
        return await load_holding(self.store, issue_id, lambda state: state.last_seq >= seq, f"seq {seq}")

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

    async def react_to_batch(self, msgs: list[Msg], handler: Any) -> None:
        """The fast path: the reactions of every issue in a fetch go into ONE multi-issue atomic append
        (each issue OCC-guarded). Whatever does not fit it — an issue with several cues in the fetch, a
        conflict, an error — takes the one-message path, in order per issue."""
        groups: dict[str, list[Msg]] = defaultdict(list)
        unread: list[Msg] = []
        for m in msgs:
            parts = m.subject.split(".")
            (groups[parts[3]] if len(parts) == 5 and parts[4] in CONSUMES else unread).append(m)
        if unread:  # events the router does not react to (its own, handlers' ...): done with
            await asyncio.gather(*(m.ack() for m in unread))
        single = {issue: ms[0] for issue, ms in groups.items()
                  if len(ms) == 1 and ms[0].subject.rsplit(".", 1)[1] in REACTS_TO - ACROSS}
        done: set[str] = set()
        if len(single) > 1:
            done = await self._react_together(single)

        async def run_group(ms: list[Msg]) -> None:
            if len(ms) > 1 and all(m.subject.endswith(".task_dispatched") for m in ms):
                await self._dispatched_together(ms)  # a dispatch's tasks: one timer for the issue
                return
            for m in ms:
                await self._one(m, handler)

        await asyncio.gather(*(run_group(g) for issue, g in groups.items() if issue not in done))

    async def _dispatched_together(self, ms: list[Msg]) -> None:
        """Several task_dispatched of one issue in a fetch (a dispatch's lead and co-tasks): handled in order
        under one work slot (only a lead's sets a timer), then every message is acked."""
        async with self.sem:
            try:
                for m in ms:
                    await self.handle_event(m)
            except (UnknownEventType, ValueError) as exc:
                log.warning("unprocessable message terminated", subject=ms[0].subject, error=str(exc))
                await asyncio.gather(*(m.term() for m in ms))
                return
            except Exception:
                log.exception("router failed on a dispatch; will retry", subject=ms[0].subject)
                await asyncio.gather(*(m.nak(delay=2) for m in ms))
                return
            await asyncio.gather(*(m.ack() for m in ms))
            self.processed += len(ms)

    async def _react_together(self, cues: dict[str, Msg]) -> set[str]:
        """Load, decide and append the reactions to one cue per issue at once; returns the issues done."""
        async def prepare(issue_id: str, msg: Msg) -> tuple[str, Msg, AppendRequest | None] | None:
            try:
                seq = msg.metadata.sequence.stream
                env = await self._cue(msg.data, seq)
                if isinstance(env.data, IssueReported):
                    # a report is its issue's first event: fold it as delivered (no round trip); if more
                    # happened meanwhile, the OCC guard refuses the append and the slow path reloads
                    state = evolve(initial_state(issue_id), env.data, seq)
                    await self.schedule_review(issue_id, env)
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
                for (_, _, req), res in zip(chunk, results, strict=True):
                    self.states.put(_after(states[req.issue_id], res.envelopes))
                # the timers are set when the leads' task_dispatched come through the consumer: setting them
                # here, before the acks, held up the next fetch (routed/s 0.155 x raw vs 0.286 on main)
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


async def _migrate_router_filter(js: JetStreamContext) -> None:
    """An earlier router's durable filtered five types (``filter_subjects``): updated in place to the one
    wildcard, keeping its position and the rest of its configuration (``pull_subscribe`` binds to an existing
    durable as it is)."""
    try:
        info = await js.consumer_info(sj.EVENTS_STREAM, "router")
    except NotFoundError:
        return
    cfg = info.config
    if cfg.filter_subject == ROUTER_FILTER and not cfg.filter_subjects:
        return
    cfg.filter_subject, cfg.filter_subjects = ROUTER_FILTER, None
    await js.add_consumer(sj.EVENTS_STREAM, config=cfg)
    log.info("router consumer now filters one wildcard", filter=ROUTER_FILTER)


async def start_router(life: Lifecycle, nc: NATS, store: JetStreamEventStore, org: OrgTree, rulebook: Rulebook,
                       clocks: SlaClocks, settings: Settings) -> Router:
    """Bind the router's durable consumers and run them until ``life`` closes; follows published rulebooks."""
    js = nc.jetstream()
    rules = RouterRules(org=org, rulebook=rulebook, clocks=clocks)
    router = Router(store, js, rules, cache_size=settings.router_state_cache)
    within = settings.start_timeout_s  # consumers of streams a fresh cluster may still be settling
    await settled("router consumer", lambda: _migrate_router_filter(js), within_s=within)
    events_sub = await settled("router consumer", lambda: js.pull_subscribe(
        ROUTER_FILTER, durable="router", stream=sj.EVENTS_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=30,
                              max_ack_pending=20_000, max_deliver=-1)), within_s=within)
    timers_sub = await settled("router timers consumer", lambda: js.pull_subscribe(
        sj.TIMER_FIRED, durable="router-timers", stream=sj.TIMERS_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=60,
                              max_ack_pending=100_000, max_deliver=-1)), within_s=within)
    life.close_on_exit(events_sub)
    life.close_on_exit(timers_sub)
    life.spawn("router", router.run_consumer(events_sub, router.handle_event, per_issue=True))
    life.spawn("router-timers", router.run_timers(timers_sub))

    def hold(rb: Rulebook) -> None:
        router.rules = replace(router.rules, rulebook=rb)

    life.on_rulebook(hold)
    return router
