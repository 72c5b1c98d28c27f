"""The router reacts only to a history that contains the event it reacts to: on an R3 stream a
direct get may be answered by a replica that is behind (a node just restarted)."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.router import timers
from services.router.service import Router
from shared.domain import commands as cmd
from shared.domain.errors import Unavailable
from shared.domain.ids import new_issue_id
from shared.domain.issue import decide, initial_state
from shared.events.codec import Envelope
from shared.store.eventstore import make_envelopes

NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
ISSUE = new_issue_id(1_700_000_000_000, 42)


def reported_at(seq: int) -> list[Envelope]:
    events = decide(initial_state(ISSUE), cmd.ReportIssue(grid="wuxing-g1", category="road_damage", title="t",
                                                          description=None, urgency="normal", risk=(),
                                                          location=None, reporter="gw", request_hash="h"), NOW)
    env = make_envelopes(ISSUE, events, version=0, now=NOW, actor="gw", causation=None, source="test")[0]
    return [Envelope(id=env.id, source=env.source, subject=env.subject, time=env.time, data=env.data,
                     actor=env.actor, causationid=None, seq=seq)]


class Replicas:
    """A store whose first ``stale`` loads come from a replica that has not applied the report yet."""

    def __init__(self, stale: int) -> None:
        self.stale, self.loads = stale, 0

    async def load(self, issue_id: str) -> list[Envelope]:
        self.loads += 1
        return [] if self.loads <= self.stale else reported_at(7)


def router(store: Any) -> Router:
    return Router(store, js=None, rules=None)  # type: ignore[arg-type]


async def test_a_stale_replica_is_read_again_until_the_cue_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timers, "STALE_BACKOFF_S", 0.0)
    store = Replicas(stale=2)
    state = await router(store).load_including(ISSUE, 7)
    assert state.exists and state.last_seq == 7
    assert store.loads == 3


async def test_a_cue_never_seen_is_left_for_redelivery_not_acked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timers, "STALE_BACKOFF_S", 0.0)
    store = Replicas(stale=10_000)
    with pytest.raises(Unavailable):
        await router(store).load_including(ISSUE, 7)
    assert store.loads == timers.STALE_RELOADS


async def test_a_fired_timer_waits_for_a_history_that_holds_its_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timer is set only after its dispatch is stored: a history without the dispatch's task is stale."""
    monkeypatch.setattr(timers, "STALE_BACKOFF_S", 0.0)
    store = Replicas(stale=10_000)  # the report only: no task, as a replica that is behind would answer
    with pytest.raises(Unavailable):
        await router(store).load_with_tasks(ISSUE, [f"{ISSUE}-1"])
    assert store.loads == timers.STALE_RELOADS
    store = Replicas(stale=0)
    state = await router(store).load_with_tasks(ISSUE)  # no task asked for: the first history will do
    assert state.exists and store.loads == 1
