"""The router's SLA clocks, escalation paths and run-time rulebook changes, on a real stack (nats-server with
JetStream message schedules, Postgres, intake over HTTP) with the second-scale clocks of fast_rules.yaml.

No mocked time: clocks of a few seconds are waited out for real. Where something must NOT happen, the test
waits until the router has drained its durable consumer (nothing pending, nothing unacknowledged), or until
the clock edge in question is safely past, before it counts events.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared import rulebooks
from shared.config import parse_rulebook
from shared.events import subjects as sj
from tests.support import NeedleHandle, events, issue, now, of_type, report, sleep_until, ts

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ORG = FIXTURES / "contract_org.yaml"
FAST = FIXTURES / "fast_rules.yaml"
GRID = "wuxing-g1"

REPORTED = "needle.issue.reported.v1"
ROUTED = "needle.issue.routed.v1"
DISPATCHED = "needle.task.dispatched.v1"
SUPERSEDED = "needle.task.superseded.v1"
WARNED = "needle.sla.warned.v1"
BREACHED = "needle.sla.breached.v1"
ESCALATED = "needle.issue.escalated.v1"
REOPENED = "needle.issue.reopened.v1"
EXT_APPROVED = "needle.task.extension_approved.v1"


# -- helpers --------------------------------------------------------------------------------------------------
async def fast_needle(needle_factory: Callable[..., Any]) -> NeedleHandle:
    # No projections: nothing here reads the read models. Stack.close() drains the NATS connection, and a
    # pull subscription left subscribed by a cancelled worker (projections, router timers) makes that drain
    # wait out nats-py's whole 30 s drain_timeout (reported as a bug); bound the wait so teardown stays quick.
    h: NeedleHandle = await needle_factory(org=ORG, rules=FAST, services=("intake", "router"))
    assert h.stack.nc is not None
    h.stack.nc.options["drain_timeout"] = 2
    return h


async def wait_issue(h: NeedleHandle, issue_id: str, predicate: Callable[[dict[str, Any]], bool],
                     timeout: float = 10.0) -> dict[str, Any]:
    body: dict[str, Any] = await h.wait_for(f"/v1/issues/{issue_id}", h.auth("admin"), predicate, timeout)
    return body


async def dispatched(h: NeedleHandle, issue_id: str, n: int = 1, timeout: float = 10.0) -> dict[str, Any]:
    """The issue once it has at least ``n`` tasks."""
    return await wait_issue(h, issue_id, lambda b: len(b["tasks"]) >= n, timeout)


async def router_idle(h: NeedleHandle, timeout: float = 10.0) -> None:
    """Wait until the router has handled (and acked) every issue event stored so far."""
    assert h.stack.nc is not None
    js = h.stack.nc.jetstream()
    deadline = asyncio.get_running_loop().time() + timeout
    info: Any = None
    while asyncio.get_running_loop().time() < deadline:
        info = await js.consumer_info(sj.EVENTS_STREAM, "router")
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"router never drained its consumer: {info}")


def tasks_at(body: dict[str, Any], level: str) -> list[dict[str, Any]]:
    return [t for t in body["tasks"] if t["level"] == level]


def lead_at(body: dict[str, Any], level: str) -> dict[str, Any]:
    (lead,) = [t for t in tasks_at(body, level) if t["role"] == "lead"]
    return lead


async def task_call(h: NeedleHandle, task: dict[str, Any], action: str, json: Any = None) -> dict[str, Any]:
    r = await h.client.post(f"/v1/tasks/{task['id']}/{action}", headers=h.auth("handler", f"dept:{task['department']}"),
                            json=json)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# -- acknowledge clock ----------------------------------------------------------------------------------------
async def test_acknowledge_breach_escalates_exactly_once(needle_factory: Callable[..., Any]) -> None:
    h = await fast_needle(needle_factory)
    iid = await report(h, "neighbour_dispute")
    body = await dispatched(h, iid)
    assert body["level"] == "community" and body["owner_area"] == "wuxing"
    lead = lead_at(body, "community")
    assert lead["department"] == "wuxing-committee" and lead["status"] == "dispatched"
    due = ts(lead["acknowledge_due"])
    assert timedelta(seconds=2.5) < due - ts(lead["dispatched_at"]) <= timedelta(seconds=3)

    # nobody acknowledges: warning, breach, escalation to the street command centre
    body = await wait_issue(h, iid, lambda b: b["level"] == "street",
                            timeout=(due - now()).total_seconds() + 5)
    arrived = now()
    assert arrived >= due
    street = lead_at(body, "street")
    assert street["department"] == "huannan-center" and street["status"] == "dispatched"
    assert body["owner_area"] == "huannan" and body["escalations"] == 1
    old = next(t for t in body["tasks"] if t["id"] == lead["id"])
    assert old["status"] == "superseded" and old["breached"] == ["acknowledge"] and "acknowledge" in old["warned"]
    # the street takes it at once (its own 3 s clock would escalate again), then nothing more may happen
    await task_call(h, street, "acknowledge")
    await asyncio.sleep(2.5)
    await router_idle(h)

    evs = await events(h, iid)
    breaches = of_type(evs, BREACHED, task_id=lead["id"], clock="acknowledge")
    escalations = of_type(evs, ESCALATED, cause="acknowledge_breach")
    assert len(breaches) == 1, breaches
    assert len(escalations) == 1, escalations
    assert escalations[0]["data"]["from_level"] == "community" and escalations[0]["data"]["to_level"] == "street"
    warned = of_type(evs, WARNED, task_id=lead["id"], clock="acknowledge")
    assert len(warned) == 1
    order = [e["type"] for e in evs]
    assert order.index(WARNED) < order.index(BREACHED) < order.index(ESCALATED)
    assert len(of_type(evs, ESCALATED)) == 1 and len(of_type(evs, BREACHED)) == 1
    routed = of_type(evs, ROUTED)
    assert [e["data"]["level"] for e in routed] == ["community", "street"]
    assert of_type(evs, SUPERSEDED, task_id=lead["id"])


async def test_ack_just_before_deadline_prevents_escalation(needle_factory: Callable[..., Any]) -> None:
    h = await fast_needle(needle_factory)
    iid = await report(h, "neighbour_dispute")
    lead = lead_at(await dispatched(h, iid), "community")
    due = ts(lead["acknowledge_due"])

    await sleep_until(due - timedelta(milliseconds=200))
    acked = await task_call(h, lead, "acknowledge")
    assert acked["status"] == "acknowledged"
    assert ts(acked["acknowledged_at"]) < due, "the test machine was too slow to acknowledge in time"

    await sleep_until(due + timedelta(seconds=2))
    await router_idle(h)
    evs = await events(h, iid)
    assert of_type(evs, BREACHED, clock="acknowledge") == []
    assert of_type(evs, ESCALATED) == []
    body = await issue(h, iid)
    assert body["level"] == "community" and body["status"] == "in_progress"
    assert lead_at(body, "community")["breached"] == []


async def test_warning_precedes_breach_and_breach_never_fires_early(needle_factory: Callable[..., Any]) -> None:
    h = await fast_needle(needle_factory)
    iid = await report(h, "road_damage")  # district: transport leads, public security co-handles
    body = await dispatched(h, iid, 2)
    lead, co = lead_at(body, "district"), next(t for t in body["tasks"] if t["role"] == "co")
    assert (lead["department"], co["department"]) == ("dinghai-roads", "dinghai-police")
    due = ts(lead["acknowledge_due"])

    body = await wait_issue(h, iid, lambda b: b["level"] == "city", timeout=(due - now()).total_seconds() + 5)
    assert lead_at(body, "city")["department"] == "city-center"
    await router_idle(h)
    evs = await events(h, iid)
    # the lead's warning, breach and escalation, in that order, each once
    for task in (lead, co):
        warned = of_type(evs, WARNED, task_id=task["id"], clock="acknowledge")
        breached = of_type(evs, BREACHED, task_id=task["id"], clock="acknowledge")
        assert len(warned) == 1, warned
        # the co-handler's breach is only recorded when its timer beats the lead's escalation (see
        # test_simultaneous_breach_of_a_co_task_is_recorded_whatever_the_order)
        assert len(breached) == 1 if task is lead else len(breached) <= 1, breached
        warn_at = ts(task["dispatched_at"]) + (ts(task["acknowledge_due"]) - ts(task["dispatched_at"])) / 2
        assert ts(warned[0]["time"]) >= warn_at, "warning fired early"
        msg = f"timer lag ({task['role']}): warning {(ts(warned[0]['time']) - warn_at).total_seconds():.3f} s"
        if breached:
            assert evs.index(warned[0]) < evs.index(breached[0])
            assert ts(breached[0]["data"]["due"]) == ts(task["acknowledge_due"])
            lag = (ts(breached[0]["time"]) - ts(breached[0]["data"]["due"])).total_seconds()
            msg += f", breach {lag:.3f} s"
            assert lag >= 0, f"breach fired {-lag:.3f} s before the due time"
        print(msg)
    (esc,) = of_type(evs, ESCALATED)  # only the lead's breach escalates
    assert esc["data"]["cause"] == "acknowledge_breach"
    assert evs.index(of_type(evs, BREACHED, task_id=lead["id"])[0]) < evs.index(esc)


def test_simultaneous_breach_of_a_co_task_is_recorded_whatever_the_order() -> None:
    """Pure repro of an order dependence seen live: lead and co-task share a due time; the lead's breach escalates
    and supersedes the co-task, whose own timer then finds it closed, so whether the co-handler's breach is on
    record (and counts against its 响应率) depends on which timer message the router happens to handle first."""
    from services.router.reactions import RouterRules, on_timer, react
    from shared.config import load_org, load_rulebook
    from shared.domain.calendar import WorkCalendar
    from shared.domain.clocks import SlaClocks
    from shared.domain.issue import evolve, initial_state
    from shared.events import models as ev

    rb = load_rulebook(FAST)
    rules = RouterRules(org=load_org(ORG), rulebook=rb, clocks=SlaClocks(WorkCalendar(rb.calendar)))
    t0 = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
    reported = ev.IssueReported(grid=GRID, category="road_damage", title="t", reporter="w", reported_at=t0)
    state = evolve(initial_state("i1"), reported, 1)
    for i, e in enumerate(react(state, reported, 1, rules, t0), 2):
        state = evolve(state, e, i)
    lead, co = state.tasks
    assert lead.acknowledge_due == co.acknowledge_due
    at = lead.acknowledge_due + timedelta(milliseconds=5)

    def breached_tasks(order: tuple[str, ...]) -> set[str]:
        s, seq = state, 100
        for task_id in order:
            for e in on_timer(s, task_id, rules, at):
                seq += 1
                s = evolve(s, e, seq)
        return {t.id for t in s.tasks if "acknowledge" in t.breached}

    co_first = breached_tasks((co.id, lead.id))
    lead_first = breached_tasks((lead.id, co.id))
    assert co_first == {lead.id, co.id}
    assert lead_first == co_first, f"lead's timer first: only {lead_first} breached"


# -- returns, explicit escalation, verification ---------------------------------------------------------------
async def test_return_by_lead_escalates_and_by_co_handler_does_not(needle_factory: Callable[..., Any]) -> None:
    h = await fast_needle(needle_factory)
    a, b = await report(h, "pothole"), await report(h, "pothole")
    issue_a, issue_b = await dispatched(h, a, 2), await dispatched(h, b, 2)

    # a co-handler's 退单 only closes its own task
    co_a = next(t for t in issue_a["tasks"] if t["role"] == "co")
    assert co_a["department"] == "dinghai-police"
    returned = await task_call(h, co_a, "return", {"reason": "not a police matter"})
    assert returned["status"] == "returned"
    await router_idle(h)
    body = await issue(h, a)
    assert body["level"] == "district" and len(body["tasks"]) == 2
    assert lead_at(body, "district")["status"] == "dispatched"
    assert of_type(await events(h, a), ESCALATED) == []

    # the lead's 退单 moves the issue one level up; the lower level's open tasks are superseded
    lead_b = lead_at(issue_b, "district")
    await task_call(h, lead_b, "return", {"reason": "county road, not ours"})
    body = await wait_issue(h, b, lambda x: x["level"] == "city")
    assert lead_at(body, "city")["department"] == "city-center"
    by_id = {t["id"]: t for t in body["tasks"]}
    assert by_id[lead_b["id"]]["status"] == "returned"
    co_b = next(t for t in issue_b["tasks"] if t["role"] == "co")
    assert by_id[co_b["id"]]["status"] == "superseded"
    await router_idle(h)
    evs = await events(h, b)
    (esc,) = of_type(evs, ESCALATED)
    assert esc["data"]["cause"] == "return" and esc["data"]["from_level"] == "district"
    assert esc["data"]["to_level"] == "city" and esc["data"]["reason"] == "county road, not ours"
    assert len(of_type(evs, ROUTED)) == 2


async def test_explicit_escalation_level_by_level_up_to_the_city(needle_factory: Callable[..., Any]) -> None:
    h = await fast_needle(needle_factory)
    iid = await report(h, "noise_complaint")
    first = lead_at(await dispatched(h, iid), "community")
    worker = h.auth("grid_worker", f"area:{GRID}")

    r = await h.client.post(f"/v1/issues/{iid}/escalate", headers=worker, json={"reason": "逐级反映"})
    assert r.status_code == 202, r.text
    body = await wait_issue(h, iid, lambda b: b["level"] == "street")
    assert lead_at(body, "street")["department"] == "huannan-center"
    assert next(t for t in body["tasks"] if t["id"] == first["id"])["status"] == "superseded"

    r = await h.client.post(f"/v1/issues/{iid}/escalate", headers=worker, json={"reason": "beyond the street"})
    assert r.status_code == 202, r.text
    body = await wait_issue(h, iid, lambda b: b["level"] == "district")
    district = tasks_at(body, "district")
    # the district's lead, plus the district command centre supervising (督办)
    assert {(t["department"], t["role"]) for t in district} == {("dinghai-police", "lead"), ("dinghai-center", "co")}
    assert all(t["status"] == "superseded" for t in tasks_at(body, "street"))

    supervisor = h.auth("supervisor", "area:dinghai")
    r = await h.client.post(f"/v1/issues/{iid}/escalate", headers=supervisor, json={"reason": "city matter"})
    assert r.status_code == 202, r.text
    body = await wait_issue(h, iid, lambda b: b["level"] == "city")
    assert lead_at(body, "city")["department"] == "city-center"

    r = await h.client.post(f"/v1/issues/{iid}/escalate", headers=worker, json={"reason": "higher still"})
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    await router_idle(h)
    evs = await events(h, iid)
    escalations = of_type(evs, ESCALATED)
    assert [(e["data"]["from_level"], e["data"]["to_level"], e["data"]["cause"]) for e in escalations] == [
        ("community", "street", "requested"), ("street", "district", "requested"), ("district", "city", "requested")]
    assert [e["data"]["level"] for e in of_type(evs, ROUTED)] == ["community", "street", "district", "city"]


async def test_failed_verification_reopens_then_escalates_the_second_time(needle_factory: Callable[..., Any]) -> None:
    h = await fast_needle(needle_factory)
    iid = await report(h, "pothole")
    worker = h.auth("grid_worker", f"area:{GRID}")

    async def fix_and_fail(level: str, n_tasks: int) -> None:
        body = await dispatched(h, iid, n_tasks)
        lead = next(t for t in body["tasks"] if t["level"] == level and t["role"] == "lead" and
                    t["status"] == "dispatched")
        await task_call(h, lead, "acknowledge")
        await task_call(h, lead, "resolve", {"note": "patched"})
        r = await h.client.post(f"/v1/issues/{iid}/verify", headers=worker,
                                json={"passed": False, "note": "still a hole"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "reopened"

    await fix_and_fail("district", 2)
    body = await dispatched(h, iid, 4)  # re-dispatched at the same level: lead and co again
    assert body["level"] == "district" and body["status"] == "dispatched"
    assert {(t["department"], t["role"], t["status"]) for t in body["tasks"][2:]} == {
        ("dinghai-roads", "lead", "dispatched"), ("dinghai-police", "co", "dispatched")}
    assert [t["status"] for t in body["tasks"][:2]] == ["resolved", "superseded"]

    await fix_and_fail("district", 4)
    body = await wait_issue(h, iid, lambda b: b["level"] == "city")
    assert lead_at(body, "city")["department"] == "city-center"
    await router_idle(h)
    evs = await events(h, iid)
    assert len(of_type(evs, REOPENED)) == 2
    (esc,) = of_type(evs, ESCALATED)
    assert esc["data"]["cause"] == "verification_failed_twice" and esc["data"]["to_level"] == "city"
    assert [e["data"]["reason"] for e in of_type(evs, ROUTED)] == ["reported", "reopened", "escalated"]


# -- extension (延期) -------------------------------------------------------------------------------------------
async def test_approved_extension_moves_the_resolve_due(needle_factory: Callable[..., Any]) -> None:
    h = await fast_needle(needle_factory)
    iid = await report(h, "road_damage")
    body = await dispatched(h, iid, 2)
    lead, co = lead_at(body, "district"), next(t for t in body["tasks"] if t["role"] == "co")
    await task_call(h, lead, "acknowledge")
    await task_call(h, co, "acknowledge")
    await task_call(h, co, "resolve", {"note": "traffic diverted"})  # the co-handler's clocks stop here
    old_due = ts(lead["resolve_due"])

    asked = await task_call(h, lead, "extension", {"extension": "PT30S", "reason": "asphalt arrives tomorrow"})
    assert asked["extension_requested"] == 30
    # a supervisor outside the issue's area may not approve; one over it may
    r = await h.client.post(f"/v1/tasks/{lead['id']}/extension/approve", headers=h.auth("supervisor", "area:wuxing-g2"))
    assert r.status_code in (401, 403), r.text
    r = await h.client.post(f"/v1/tasks/{lead['id']}/extension/approve", headers=h.auth("supervisor", "area:dinghai"))
    assert r.status_code == 200, r.text
    assert ts(r.json()["resolve_due"]) == old_due + timedelta(seconds=30)
    assert now() < old_due, "the test machine was too slow to approve before the old due time"

    await sleep_until(old_due + timedelta(seconds=2))
    await router_idle(h)
    body = await issue(h, iid)
    assert body["level"] == "district" and body["status"] == "in_progress"
    assert ts(lead_at(body, "district")["resolve_due"]) == old_due + timedelta(seconds=30)
    assert lead_at(body, "district")["breached"] == []
    evs = await events(h, iid)
    assert of_type(evs, BREACHED, task_id=lead["id"]) == []
    assert of_type(evs, ESCALATED) == []
    assert len(of_type(evs, EXT_APPROVED)) == 1


# -- the rulebook changes at run time ---------------------------------------------------------------------------
async def test_rulebook_published_at_run_time(needle_factory: Callable[..., Any]) -> None:
    h = await fast_needle(needle_factory)
    before = lead_at(await dispatched(h, await report(h, "pothole"), 2), "district")
    assert ts(before["acknowledge_due"]) - ts(before["dispatched_at"]) == timedelta(minutes=10)

    text = FAST.read_text().replace("sla: {acknowledge: PT10M, resolve: PT1H, clock: natural}\n    handlers:\n"
                                    "      district: {lead: transport",
                                    "sla: {acknowledge: PT25M, resolve: PT1H, clock: natural}\n    handlers:\n"
                                    "      district: {lead: transport")
    assert text != FAST.read_text()
    rb = parse_rulebook(text, "x")
    assert rb.version != h.stack.rulebook.version
    assert h.stack.nc is not None
    await rulebooks.publish(h.stack.nc, rb, text, "x", by="test")
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        r = await h.client.get("/healthz")
        if r.json().get("rulebook_version") == rb.version:
            break
        assert asyncio.get_running_loop().time() < deadline, r.text
        await asyncio.sleep(0.05)

    after_id = await report(h, "pothole")
    after = await dispatched(h, after_id, 2)
    assert after["rulebook_version"] == rb.version
    new_lead = lead_at(after, "district")
    assert ts(new_lead["acknowledge_due"]) - ts(new_lead["dispatched_at"]) == timedelta(minutes=25)
    # the issue dispatched before keeps its deadline
    again = lead_at(await issue(h, ids_of(before)), "district")
    assert again["acknowledge_due"] == before["acknowledge_due"]
    assert (await issue(h, ids_of(before)))["rulebook_version"] != rb.version


def ids_of(task: dict[str, Any]) -> str:
    issue_id: str = task["id"].rpartition("-")[0]
    return issue_id


pytestmark = pytest.mark.timeout(60)
