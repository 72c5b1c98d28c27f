"""The JetStream event store against a real nats-server: optimistic concurrency, atomic batches,
idempotency through ``Nats-Msg-Id``, ordered loads, and loads past one direct-get batch."""
from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from shared.commanding import execute, load_state
from shared.domain import commands as cmd
from shared.domain.errors import ConcurrencyConflict
from shared.domain.issue import IssueState, decide
from shared.events import models as ev
from shared.events import subjects as sj
from shared.store.eventstore import BATCH_MAX, Appended, JetStreamEventStore
from shared.store.streams import StreamOptions, ensure_streams

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@dataclass
class Js:
    nc: NATS
    store: JetStreamEventStore

    async def stored(self) -> int:
        """How many messages NEEDLE_EVENTS holds (every subject)."""
        info = await self.nc.jetstream().stream_info(sj.EVENTS_STREAM)
        return int(info.state.messages)


@pytest.fixture
async def js(nats_factory: Callable[[], Any]) -> AsyncIterator[Js]:
    server = nats_factory()
    nc = await nats.connect(server.url)
    await ensure_streams(nc, StreamOptions(duplicate_window_s=120))
    store = JetStreamEventStore(nc)
    await store.start()
    yield Js(nc, store)
    await nc.close()


def reported(title: str = "pothole") -> ev.IssueReported:
    return ev.IssueReported(grid="wuxing-g1", category="road_damage", title=title, reporter="gw-1", reported_at=NOW)


def urged(by: str) -> ev.IssueUrged:
    return ev.IssueUrged(by=by)


async def new_issue(store: JetStreamEventStore, issue_id: str) -> Appended:
    return await store.append(issue_id, [reported()], expected_last_seq=0, version=0, now=NOW, actor="gw-1")


@pytest.mark.parametrize("size", [1, 3], ids=["single", "atomic-batch"])
async def test_two_writers_with_the_same_expected_seq_exactly_one_wins(js: Js, size: int) -> None:
    for round_ in range(5):  # a few rounds: the race must always end the same way
        issue = f"occ{size}r{round_}"
        first = await new_issue(js.store, issue)

        async def write(who: str, issue: str = issue, after: int = first.seq) -> Appended:
            return await js.store.append(issue, [urged(f"{who}{i}") for i in range(size)],
                                         expected_last_seq=after, version=1, now=NOW, actor=who)

        results = await asyncio.gather(write("a"), write("b"), return_exceptions=True)
        won = [r for r in results if isinstance(r, Appended)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1 and len(lost) == 1, results
        assert isinstance(lost[0], ConcurrencyConflict), repr(lost[0])
        assert lost[0].retryable is True
        assert not won[0].duplicate

        envs = await js.store.load(issue)
        assert len(envs) == 1 + size  # the loser stored nothing, not even part of its batch
        winner = {e.data.by for e in envs[1:]}  # type: ignore[attr-defined]
        assert winner in ({f"a{i}" for i in range(size)}, {f"b{i}" for i in range(size)})
        assert [e.seq for e in envs[1:]] == [e.seq for e in won[0].envelopes]


@pytest.mark.parametrize("writers", [2, 5])
async def test_execute_applies_concurrent_commands_exactly_once(js: Js, writers: int) -> None:
    issue = f"exec{writers}"
    await new_issue(js.store, issue)

    def urge(by: str) -> Callable[[IssueState, datetime], list[ev.Event]]:
        def decide_(state: IssueState, now: datetime) -> list[ev.Event]:
            return decide(state, cmd.UrgeIssue(by=by), now)
        return decide_

    outcomes = await asyncio.gather(*(execute(js.store, issue, urge(f"sup{i}"), actor=f"sup{i}", source="test")
                                      for i in range(writers)))
    assert all(len(o.envelopes) == 1 for o in outcomes)

    envs = await js.store.load(issue)
    by = Counter(e.data.by for e in envs if isinstance(e.data, ev.IssueUrged))
    assert by == Counter({f"sup{i}": 1 for i in range(writers)})  # none lost, none twice
    assert len(envs) == 1 + writers
    assert [e.id for e in envs] == [f"{issue}.{n}" for n in range(1, writers + 2)]  # versions 1..n, no gap
    assert sorted(o.seq for o in outcomes) == [e.seq for e in envs[1:]]
    state, _ = await load_state(js.store, issue)
    assert state.version == 1 + writers and state.last_seq == envs[-1].seq


@pytest.mark.parametrize("expected", [0, 1, 99], ids=["new", "stale", "future"])
async def test_atomic_batch_with_a_wrong_expected_seq_stores_none_of_its_events(js: Js, expected: int) -> None:
    await new_issue(js.store, "other")  # seq 1 belongs to another issue
    first = await new_issue(js.store, "atom")  # seq 2
    head = await js.store.append("atom", [urged("x")], expected_last_seq=first.seq, version=1, now=NOW)  # seq 3
    assert expected != head.seq
    before = await js.stored()

    with pytest.raises(ConcurrencyConflict):
        await js.store.append("atom", [urged("b1"), urged("b2"), urged("b3")], expected_last_seq=expected,
                              version=2, now=NOW)
    assert await js.stored() == before
    assert [type(e.data) for e in await js.store.load("atom")] == [ev.IssueReported, ev.IssueUrged]

    # the failed batch leaves nothing half-open on the server: the right batch then lands whole, contiguously
    ok = await js.store.append("atom", [urged("c1"), urged("c2"), urged("c3")], expected_last_seq=head.seq,
                               version=2, now=NOW)
    envs = await js.store.load("atom")
    assert [e.data.by for e in envs[2:]] == ["c1", "c2", "c3"]  # type: ignore[attr-defined]
    assert [e.seq for e in envs[2:]] == [ok.seq - 2, ok.seq - 1, ok.seq] == [e.seq for e in ok.envelopes]


async def test_load_returns_events_oldest_first_with_their_stream_seqs(js: Js) -> None:
    a = await new_issue(js.store, "ordera")
    b = await new_issue(js.store, "orderb")
    seq_a, seq_b = a.seq, b.seq
    for i in range(4):  # interleave two issues so each one's seqs have gaps
        seq_a = (await js.store.append("ordera", [urged(f"a{i}")], expected_last_seq=seq_a, version=1 + i,
                                       now=NOW)).seq
        seq_b = (await js.store.append("orderb", [urged(f"b{i}"), urged(f"b{i}'")], expected_last_seq=seq_b,
                                       version=1 + 2 * i, now=NOW)).seq

    envs = await js.store.load("ordera")
    assert [e.data.by for e in envs[1:]] == ["a0", "a1", "a2", "a3"]  # type: ignore[attr-defined]
    seqs = [e.seq for e in envs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] == a.seq and seqs[-1] == seq_a
    assert all(e.subject == "ordera" for e in envs)
    assert [e.id for e in envs] == [f"ordera.{n}" for n in range(1, 6)]

    raw = await js.nc.jetstream().get_msg(sj.EVENTS_STREAM, seqs[2])  # the seq really is the stream's
    assert raw.subject == sj.issue_event("ordera", "issue_urged")

    later = await js.store.load("ordera", after_seq=seqs[2])
    assert [e.seq for e in later] == seqs[3:]
    assert await js.store.load("nosuchissue") == []


async def test_msg_id_seen_within_the_window_is_a_duplicate_and_stores_nothing(js: Js) -> None:
    first = await new_issue(js.store, "dup")
    res = await js.store.append("dup", [urged("u")], expected_last_seq=first.seq, version=1, now=NOW, msg_id="m-1")
    assert not res.duplicate
    before = await js.stored()

    again = await js.store.append("dup", [urged("u")], expected_last_seq=res.seq, version=2, now=NOW, msg_id="m-1")
    assert again.duplicate is True
    assert again.seq == res.seq  # points at the original write
    # the same id on another subject is the same message too (msg ids are stream-wide)
    other = await js.store.append("dup2", [reported()], expected_last_seq=0, version=0, now=NOW, msg_id="m-1")
    assert other.duplicate is True

    # a faithful replay (same expected seq) is refused by the OCC check: nothing stored either
    with pytest.raises(ConcurrencyConflict):
        await js.store.append("dup", [urged("u")], expected_last_seq=first.seq, version=1, now=NOW, msg_id="m-1")
    assert await js.stored() == before
    assert len(await js.store.load("dup")) == 2
    assert await js.store.load("dup2") == []


async def test_replayed_atomic_batch_is_reported_as_duplicate_not_unavailable(js: Js) -> None:
    first = await new_issue(js.store, "dupb")
    batch = [urged("r1"), urged("r2")]
    await js.store.append("dupb", batch, expected_last_seq=first.seq, version=1, now=NOW, msg_id="route:dupb:1")
    before = await js.stored()
    try:
        res = await js.store.append("dupb", batch, expected_last_seq=first.seq, version=1, now=NOW,
                                    msg_id="route:dupb:1")
    except ConcurrencyConflict:
        pass  # acceptable: the caller reloads and sees its own write
    else:
        assert res.duplicate
    assert await js.stored() == before


async def test_load_of_an_issue_with_more_events_than_one_direct_get_batch(js: Js) -> None:
    first = await new_issue(js.store, "big")
    seq, version = first.seq, 1
    for chunk in range(2):  # 1 + 2 * BATCH_MAX events, in BATCH_MAX-sized atomic batches
        await new_issue(js.store, f"noise{chunk}")  # another issue's event between the pages
        res = await js.store.append("big", [urged(f"{chunk}.{i}") for i in range(BATCH_MAX)],
                                    expected_last_seq=seq, version=version, now=NOW)
        seq, version = res.seq, version + BATCH_MAX

    envs = await js.store.load("big")
    assert len(envs) == 1 + 2 * BATCH_MAX
    assert envs[0].seq == first.seq and envs[-1].seq == seq
    assert all(x.seq < y.seq for x, y in itertools.pairwise(envs))
    assert [e.id for e in envs] == [f"big.{n}" for n in range(1, 2 * BATCH_MAX + 2)]
    assert {e.subject for e in envs} == {"big"}
    state, _ = await load_state(js.store, "big")
    assert state.version == 1 + 2 * BATCH_MAX and state.last_seq == seq


async def test_concurrent_loads_of_different_issues_do_not_cross(js: Js) -> None:
    for i in range(40):
        await js.store.append(f"many{i}", [urged(f"by{i}")] * (1 + i % 3), expected_last_seq=0, version=0, now=NOW)
    loads = await asyncio.gather(*(js.store.load(f"many{i}") for i in range(40)))
    for i, envs in enumerate(loads):
        assert len(envs) == 1 + i % 3
        assert {e.subject for e in envs} == {f"many{i}"}
        assert {e.data.by for e in envs} == {f"by{i}"}  # type: ignore[attr-defined]


async def test_is_current_asks_whether_the_issue_has_an_event_after_a_seq(js: Js) -> None:
    """The leader's answer through ``last_by_subj`` (the per-subject index), with other issues' events after."""
    first = await new_issue(js.store, "cur")
    assert await js.store.is_current("cur", first.seq)
    await new_issue(js.store, "cur-other")  # a later event of another issue changes nothing
    assert await js.store.is_current("cur", first.seq)
    second = await js.store.append("cur", [urged("x"), urged("y")], expected_last_seq=first.seq, version=1, now=NOW)
    assert not await js.store.is_current("cur", first.seq)
    assert await js.store.is_current("cur", second.seq)
    assert await js.store.is_current("never-reported", 0)


async def test_load_of_an_issue_whose_types_repeat_among_many_other_issues(js: Js) -> None:
    """``load`` gathers the last event of each of the issue's subjects, then each subject's events: a type
    repeated (urged thrice) and types interleaved with other issues come back whole and in order."""
    first = await new_issue(js.store, "mix")
    seq, version = first.seq, 1
    for i in range(3):
        for j in range(5):
            await new_issue(js.store, f"mix-noise-{i}-{j}")
        res = await js.store.append("mix", [urged(f"u{i}")], expected_last_seq=seq, version=version, now=NOW)
        seq, version = res.seq, version + 1
    envs = await js.store.load("mix")
    assert [type(e.data).__name__ for e in envs] == ["IssueReported"] + ["IssueUrged"] * 3
    assert [e.data.by for e in envs[1:]] == ["u0", "u1", "u2"]  # type: ignore[attr-defined]
    assert [e.seq for e in envs] == sorted(e.seq for e in envs) and envs[-1].seq == seq
    assert [e.seq for e in await js.store.load("mix", after_seq=envs[1].seq)] == [e.seq for e in envs[2:]]
    assert await js.store.load("mix", after_seq=seq) == []


async def test_an_unstarted_store_appends_and_loads_and_concurrent_appends_get_their_own_acks(
        js: Js, nats_factory: Callable[[], Any]) -> None:
    """Appends wait for their ack through the store's reply inbox (not nats-py's request): a store nobody
    started subscribes on first use, once, and each of many appends in flight gets its own ack."""
    server = nats_factory()
    nc = await nats.connect(server.url)
    try:
        await ensure_streams(nc, StreamOptions(duplicate_window_s=120))
        store = JetStreamEventStore(nc)  # no start()
        ids = [f"01hzinbox{n:017d}" for n in range(50)]
        acks = await asyncio.gather(*(new_issue(store, i) for i in ids))
        assert sorted(a.seq for a in acks) == list(range(1, 51))  # one ack each, none shared
        for issue_id, ack in zip(ids, acks, strict=True):
            envs = await store.load(issue_id)
            assert [e.seq for e in envs] == [ack.seq]
    finally:
        await nc.close()


async def test_an_append_with_nothing_listening_is_unavailable_not_a_hang(js: Js) -> None:
    """A subject no stream captures: the server says no responders, the store says Unavailable at once."""
    from shared.domain.errors import Unavailable

    t0 = asyncio.get_running_loop().time()
    with pytest.raises(Unavailable, match="not available"):
        await js.store._request("needle.nowhere.at.all", b"{}", {})
    assert asyncio.get_running_loop().time() - t0 < 2.0
