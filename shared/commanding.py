"""Run a command against one issue: load, fold, decide, append with OCC; on a concurrent
write reload and decide again, a bounded number of times (then the caller gets a 409)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.domain.errors import ConcurrencyConflict, DomainError
from shared.domain.issue import IssueState, evolve, initial_state
from shared.events.codec import Envelope
from shared.events.models import Event
from shared.store.eventstore import Appended, EventStore

MAX_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Outcome:
    state: IssueState
    seq: int  # stream sequence of the last event written (or of the current state if nothing was)
    envelopes: tuple[Envelope, ...]


async def load_state(store: EventStore, issue_id: str) -> tuple[IssueState, list[Envelope]]:
    """The issue as the replica that answers knows it (see ``load_current_state``)."""
    envs = await store.load(issue_id)
    state = initial_state(issue_id)
    for e in envs:
        state = evolve(state, e.data, e.seq)
    return state, envs


async def load_current_state(store: EventStore, issue_id: str, attempts: int = 5
                             ) -> tuple[IssueState, list[Envelope]]:
    """The issue with every event the stream leader has: reloaded while the leader knows more."""
    for _ in range(attempts - 1):
        state, envs = await load_state(store, issue_id)
        if await store.is_current(issue_id, state.last_seq):
            return state, envs
    return await load_state(store, issue_id)


async def load_existing_state(store: EventStore, issue_id: str) -> tuple[IssueState, list[Envelope]]:
    """As ``load_state``, but an issue the answering replica does not know is asked of the leader before it
    counts as missing: a read right after the 201 of a report never says 404 (nor 403 for want of a grid)."""
    state, envs = await load_state(store, issue_id)
    if not state.exists:
        state, envs = await load_current_state(store, issue_id)
    return state, envs


async def append_first(store: EventStore, aggregate_id: str, events: list[Event], *, now: datetime,
                       actor: str | None, msg_id: str, source: str) -> Appended | None:
    """Create an aggregate whose id may come from an Idempotency-Key: its first events, guarded by an expected
    last subject sequence of 0. None when the aggregate exists already (a replay of the same key, even after
    JetStream's duplicate window): the caller loads it and compares its request hash."""
    try:
        res = await store.append(aggregate_id, events, expected_last_seq=0, version=0, now=now, actor=actor,
                                 msg_id=msg_id, source=source)
    except ConcurrencyConflict:
        return None
    return None if res.duplicate else res


def utcnow() -> datetime:
    return datetime.now(UTC)


async def execute(store: EventStore, issue_id: str, decide: Callable[[IssueState, datetime], list[Event]], *,
                  actor: str | None, source: str, clock: Callable[[], datetime] = utcnow,
                  msg_id: Callable[[IssueState], str | None] | None = None, causation: str | None = None) -> Outcome:
    """Decide against the current state and append. ``decide`` may raise a DomainError."""
    for attempt in range(MAX_ATTEMPTS):
        state, _ = await load_state(store, issue_id)
        now = clock()
        try:
            events = decide(state, now)
        except DomainError as exc:
            # a refusal must come from the whole history, not from a replica that is behind
            if exc.retryable or attempt == MAX_ATTEMPTS - 1 or await store.is_current(issue_id, state.last_seq):
                raise
            continue
        if not events:
            return Outcome(state=state, seq=state.last_seq, envelopes=())
        try:
            res = await store.append(issue_id, events, expected_last_seq=state.last_seq, version=state.version,
                                     now=now, actor=actor, msg_id=msg_id(state) if msg_id else None,
                                     causation=causation, source=source)
        except ConcurrencyConflict:
            if attempt == MAX_ATTEMPTS - 1:
                raise
            continue
        for env in res.envelopes:
            state = evolve(state, env.data, env.seq)
        return Outcome(state=state, seq=res.seq, envelopes=res.envelopes)
    raise ConcurrencyConflict("too many concurrent writers")  # pragma: no cover
