"""The router's batched timer path (``Router.fire_issues``) on a real nats-server: several issues' fired timers in
one multi-issue atomic append, a stale cached state refused by OCC and decided again on the stream's state, each
edge recorded once, each issue's next timer set. No clock is waited out: the issues were dispatched two hours ago
(contract rules: acknowledge PT30M), so their acknowledge edges are all past when the timers are handled."""
from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats
import orjson

from services.router.reactions import RouterRules, react
from services.router.service import Router
from shared.commanding import load_state, utcnow
from shared.config import load_org, load_rulebook
from shared.domain import commands as cmd
from shared.domain.calendar import WorkCalendar
from shared.domain.clocks import SlaClocks
from shared.domain.ids import new_issue_id
from shared.domain.issue import IssueState, decide, evolve, initial_state
from shared.events import models as ev
from shared.events import subjects as sj
from shared.store.eventstore import JetStreamEventStore
from shared.store.streams import ensure_streams

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RULES = RouterRules(org=load_org(FIXTURES / "contract_org.yaml"),
                    rulebook=load_rulebook(FIXTURES / "contract_rules.yaml"),
                    clocks=SlaClocks(WorkCalendar("natural")))


async def dispatched_long_ago(store: JetStreamEventStore, n: int) -> IssueState:
    """Road damage reported and dispatched (district lead + co-task) two hours ago, nobody acknowledged."""
    then = utcnow() - timedelta(hours=2)
    issue_id = new_issue_id(int(then.timestamp() * 1000), n)
    reported = ev.IssueReported(grid="wuxing-g1", category="road_damage", title="t", reporter="gw", reported_at=then)
    res = await store.append(issue_id, [reported], expected_last_seq=0, version=0, now=then)
    state = evolve(initial_state(issue_id), reported, res.seq)
    routed = react(state, reported, res.seq, RULES, then)
    res = await store.append(issue_id, routed, expected_last_seq=state.last_seq, version=state.version, now=then)
    for e in res.envelopes:
        state = evolve(state, e.data, e.seq)
    return state


async def subjects_of(js: Any, subject: str) -> dict[str, int]:
    return dict((await js.stream_info(sj.TIMERS_STREAM, subjects_filter=subject)).state.subjects or {})


def kinds(state: IssueState, task_id: str) -> tuple[frozenset[str], frozenset[str]]:
    t = state.task(task_id)
    return frozenset(t.warned), frozenset(t.breached)


async def test_fired_timers_are_handled_in_one_batch_once_each_and_a_stale_state_is_never_acted_on(
        nats_factory: Callable[[], Any]) -> None:
    nc = await nats.connect(nats_factory().url)
    try:
        await ensure_streams(nc)
        store = JetStreamEventStore(nc)
        await store.start()
        router = Router(store, nc.jetstream(), RULES)
        stale, late_a, late_b = [await dispatched_long_ago(store, i) for i in range(3)]
        lead, co = (t.id for t in stale.tasks)
        # the router knows ``stale`` as it dispatched it; a handler acknowledged the lead since
        router.states.put(stale)
        ack = decide(stale, cmd.AcknowledgeTask(lead, by="roads"), utcnow())
        await store.append(stale.id, ack, expected_last_seq=stale.last_seq, version=stale.version, now=utcnow())

        fired = {i.id: {i.tasks[0].id} for i in (stale, late_a, late_b)}  # the dispatches' timers fired
        failed = await router.fire_issues(fired)

        assert failed == {}
        # the acknowledged lead is neither warned nor breached (the cached state said it was unacknowledged);
        # its co-task is, and a co-task's breach does not escalate
        now_stale, _ = await load_state(store, stale.id)
        assert kinds(now_stale, lead) == (frozenset(), frozenset())
        assert kinds(now_stale, co) == ({"acknowledge"}, {"acknowledge"})
        assert now_stale.level == "district" and now_stale.escalations == 0
        # the others: both tasks warned and breached, the lead's breach escalated them to the city
        for issue in (late_a, late_b):
            s, envs = await load_state(store, issue.id)
            assert [kinds(s, t.id) for t in issue.tasks] == [({"acknowledge"}, {"acknowledge"})] * 2
            assert s.level == "city" and s.escalations == 1
            assert [e.data.name for e in envs].count("issue_escalated") == 1
        # every issue's next timer is set, for the earliest edge over its open tasks
        js = nc.jetstream()
        city_lead = (await load_state(store, late_a.id))[0].lead
        assert city_lead is not None and city_lead.department == "city-center"
        for issue_id, key, at in ((stale.id, lead, now_stale.task(lead).resolve_warn),
                                  (late_a.id, city_lead.id, city_lead.acknowledge_warn)):
            body = orjson.loads((await js.get_last_msg(sj.TIMERS_STREAM, sj.timer_schedule(key))).data)
            assert body == {"issue": issue_id, "task": key, "at": at.isoformat()}
        # one timer per issue: none for the superseded district dispatches
        late_b_city = (await load_state(store, late_b.id))[0].tasks[-1].id
        assert set(await subjects_of(js, sj.TIMER_SCHEDULES)) == {
            sj.timer_schedule(k) for k in (lead, city_lead.id, late_b_city)}

        # the same timers handled again (a redelivery, another router): nothing more is recorded
        before = {i: len(await store.load(i)) for i in (stale.id, late_a.id, late_b.id)}
        assert await router.fire_issues(fired) == {}
        router.states = type(router.states)()
        assert await router.fire_issues(fired) == {}
        assert {i: len(await store.load(i)) for i in before} == before
    finally:
        await nc.close()
