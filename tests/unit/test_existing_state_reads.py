"""Reads that answer "not found" ask the stream leader first: on an R3 stream a direct get may be answered by
a replica that has not applied the report yet (a node just restarted, or the read came right after the 201)."""
from __future__ import annotations

from datetime import UTC, datetime

from shared.commanding import load_existing_state
from shared.domain import commands as cmd
from shared.domain.ids import new_issue_id
from shared.domain.issue import decide, initial_state
from shared.events.codec import Envelope
from shared.store.eventstore import make_envelopes

NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
ISSUE = new_issue_id(1_700_000_000_000, 7)


def reported(seq: int) -> list[Envelope]:
    events = decide(initial_state(ISSUE), cmd.ReportIssue(grid="wuxing-g1", category="road_damage", title="t",
                                                          description=None, reporter="gw"), NOW)
    env = make_envelopes(ISSUE, events, version=0, now=NOW, actor="gw", causation=None, source="test")[0]
    return [Envelope(id=env.id, source=env.source, subject=env.subject, time=env.time, data=env.data,
                     actor=env.actor, seq=seq)]


class Replicas:
    """The first ``stale`` loads come from a replica without the report; the leader has it at seq 5 (or never,
    when ``exists`` is false)."""

    def __init__(self, stale: int, exists: bool = True) -> None:
        self.stale, self.exists, self.loads, self.leader_asked = stale, exists, 0, 0

    async def load(self, issue_id: str, after_seq: int = 0) -> list[Envelope]:
        self.loads += 1
        return reported(5) if self.exists and self.loads > self.stale else []

    async def is_current(self, issue_id: str, last_seq: int) -> bool:
        self.leader_asked += 1
        return not self.exists or last_seq >= 5


async def test_a_replica_that_is_behind_does_not_make_an_issue_missing() -> None:
    store = Replicas(stale=1)
    state, envs = await load_existing_state(store, ISSUE)  # type: ignore[arg-type]
    assert state.exists and state.grid == "wuxing-g1" and [e.seq for e in envs] == [5]
    assert store.leader_asked >= 1


async def test_a_found_issue_costs_one_read() -> None:
    store = Replicas(stale=0)
    state, _ = await load_existing_state(store, ISSUE)  # type: ignore[arg-type]
    assert state.exists and store.loads == 1 and store.leader_asked == 0


async def test_an_issue_the_leader_does_not_have_either_is_missing() -> None:
    store = Replicas(stale=0, exists=False)
    state, envs = await load_existing_state(store, ISSUE)  # type: ignore[arg-type]
    assert not state.exists and envs == []
    assert store.leader_asked == 1
