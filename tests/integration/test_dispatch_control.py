"""Dispatch control (issue 19) through the HTTP API on a real stack (nats-server, intake, router): 退单审核
(reviewed returns), 改派 (reassignment), 缓办 (suspension) with its review reminder, extension refusal and the
rulebook's caps. dispatch_rules.yaml: returns need the command centre; extension {max: PT1H, max_count: 1};
suspension {max: P30D, max_count: 2}, care_home {max: P90D, max_count: 1}.
"""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_router_recovery import Routers, poll, precreate_router_consumers
from tests.integration.test_router_recovery import router_idle as router_idle_js
from tests.integration.test_router_sla import lead_at, router_idle, task_call
from tests.support import NeedleHandle, events, issue, now, of_type, report, sleep_until, ts

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ORG = FIXTURES / "contract_org.yaml"
RULES = FIXTURES / "dispatch_rules.yaml"

DISPATCHED = "needle.task.dispatched.v1"
SUPERSEDED = "needle.task.superseded.v1"
ESCALATED = "needle.issue.escalated.v1"
WARNED = "needle.sla.warned.v1"
BREACHED = "needle.sla.breached.v1"
RETURNED = "needle.task.returned.v1"
RETURN_REQUESTED = "needle.task.return_requested.v1"
RETURN_REJECTED = "needle.task.return_rejected.v1"
RETURN_APPROVED = "needle.task.return_approved.v1"
REASSIGNED = "needle.task.reassigned.v1"
EXT_REJECTED = "needle.task.extension_rejected.v1"
EXT_APPROVED = "needle.task.extension_approved.v1"
SUSPENDED = "needle.task.suspension_approved.v1"
REVIEW_DUE = "needle.task.suspension_review_due.v1"
RESUMED = "needle.task.resumed.v1"
CLOCKS_PAUSED = "needle.task.clocks_paused.v1"
CLOCKS_RESUMED = "needle.task.clocks_resumed.v1"
PROGRESS_MISSED = "needle.task.progress_missed.v1"


async def control_needle(needle_factory: Callable[..., Any]) -> NeedleHandle:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES, services=("intake", "router"))
    assert h.stack.nc is not None
    h.stack.nc.options["drain_timeout"] = 2
    return h


async def dispatched(h: NeedleHandle, issue_id: str, n: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = await h.wait_for(f"/v1/issues/{issue_id}", h.auth("admin"),
                                            lambda b: len(b["tasks"]) >= n, 10)
    return body


async def post(h: NeedleHandle, path: str, headers: dict[str, str], json: Any = None, status: int = 200) -> Any:
    r = await h.client.post(path, headers=headers, json=json)
    assert r.status_code == status, r.text
    return r.json()


def center(h: NeedleHandle, dept: str) -> dict[str, str]:
    return h.auth("handler", f"dept:{dept}")


# -- 退单审核 ---------------------------------------------------------------------------------------------------
async def test_return_rejected_stays_with_the_department(needle_factory: Callable[..., Any]) -> None:
    h = await control_needle(needle_factory)
    iid = await report(h, "pothole")  # district: lead dinghai-roads, co dinghai-police
    lead = lead_at(await dispatched(h, iid, 2), "district")
    asked = await task_call(h, lead, "return", {"reason": "this is a private road"})
    assert asked["return_requested"] == "this is a private road" and asked["status"] == "dispatched"
    path = f"/v1/tasks/{lead['id']}/return/reject"
    # the street's command centre is below the owner area (dinghai); the co-handler is no command centre
    await post(h, path, center(h, "huannan-center"), {"reason": "x"}, 403)
    await post(h, path, center(h, "dinghai-police"), {"reason": "x"}, 403)
    rejected = await post(h, path, center(h, "dinghai-center"), {"reason": "the road is public"})
    assert rejected["return_requested"] is None and rejected["return_rejections"] == 1
    assert rejected["status"] == "dispatched" and rejected["department"] == "dinghai-roads"
    await post(h, path, center(h, "dinghai-center"), {"reason": "again"}, 409)  # nothing to review any more
    await router_idle(h)
    evs = await events(h, iid)
    assert len(of_type(evs, RETURN_REQUESTED)) == 1 and len(of_type(evs, RETURN_REJECTED)) == 1
    assert of_type(evs, RETURNED) == [] and of_type(evs, ESCALATED) == []
    body = await issue(h, iid)
    assert len(body["tasks"]) == 2 and body["level"] == "district"
    await task_call(h, lead, "acknowledge")  # still the department's to do


async def test_return_approved_goes_to_a_named_department(needle_factory: Callable[..., Any]) -> None:
    h = await control_needle(needle_factory)
    iid = await report(h, "pothole")
    lead = lead_at(await dispatched(h, iid, 2), "district")
    await task_call(h, lead, "return", {"reason": "not ours"})
    path = f"/v1/tasks/{lead['id']}/return/approve"
    r = await h.client.post(path, headers=center(h, "dinghai-center"), json={"reassign_to": "huannan-center"})
    assert r.status_code == 422 and "reassign_to" in r.text, r.text  # the street's centre does not serve dinghai
    r = await h.client.post(path, headers=center(h, "dinghai-center"), json={"reassign_to": "nobody"})
    assert r.status_code == 422 and "reassign_to" in r.text, r.text
    out = await post(h, path, center(h, "dinghai-center"), {"reassign_to": "city-center", "reason": "city roads"})
    assert out["status"] == "returned" and out["reassigned_to"] == f"{iid}-3"
    body = await issue(h, iid)
    new = body["tasks"][2]
    assert (new["id"], new["department"], new["role"], new["level"]) == (f"{iid}-3", "city-center", "lead", "district")
    assert body["tasks"][1]["status"] == "dispatched"  # the co-handler carries on
    await router_idle(h)
    evs = await events(h, iid)
    (approved,) = of_type(evs, RETURN_APPROVED)
    assert approved["data"]["to_department"] == "city-center" and approved["actor"].startswith("handler")
    assert of_type(evs, ESCALATED) == [] and of_type(evs, RETURNED) == []
    assert len(of_type(evs, DISPATCHED)) == 3


async def test_return_approved_goes_to_the_rules_next(needle_factory: Callable[..., Any]) -> None:
    h = await control_needle(needle_factory)
    iid = await report(h, "noise_complaint")  # community: lead wuxing-committee; no centre at wuxing
    (lead,) = (await dispatched(h, iid))["tasks"]
    await task_call(h, lead, "return", {"reason": "a police matter"})
    # a supervisor over the owner area may decide too; the grid's may not
    await post(h, f"/v1/tasks/{lead['id']}/return/approve", h.auth("supervisor", "area:wuxing-g1"), None, 403)
    await post(h, f"/v1/tasks/{lead['id']}/return/approve", h.auth("supervisor", "area:huannan"))
    body = await issue(h, iid)
    assert [(t["department"], t["status"]) for t in body["tasks"]] == [
        ("wuxing-committee", "returned"), ("huannan-center", "dispatched")]  # the nearest centre above
    assert body["level"] == "community"


async def test_approved_return_with_nobody_left_escalates(needle_factory: Callable[..., Any]) -> None:
    h = await control_needle(needle_factory)
    iid = await report(h, "stray_dogs")  # street: huannan-center leads
    (lead,) = (await dispatched(h, iid))["tasks"]
    assert lead["department"] == "huannan-center"
    await task_call(h, lead, "return", {"reason": "the district's dog squad"})
    await post(h, f"/v1/tasks/{lead['id']}/return/approve", center(h, "dinghai-center"))
    body = await h.wait_for(f"/v1/issues/{iid}", h.auth("admin"), lambda b: b["level"] == "district", 10)
    assert lead_at(body, "district")["department"] == "dinghai-center"
    await router_idle(h)
    (esc,) = of_type(await events(h, iid), ESCALATED)
    assert esc["data"]["cause"] == "return" and esc["data"]["reason"] == "the district's dog squad"


# -- 改派 --------------------------------------------------------------------------------------------------------
async def test_reassignment_by_a_supervisor(needle_factory: Callable[..., Any]) -> None:
    h = await control_needle(needle_factory)
    iid = await report(h, "noise_complaint")
    (lead,) = (await dispatched(h, iid))["tasks"]
    path = f"/v1/tasks/{lead['id']}/reassign"
    body = {"department": "huannan-center", "reason": "a street-wide matter"}
    await post(h, path, h.auth("supervisor", "area:wuxing-g2"), body, 403)  # the grid's scope: not the owner area
    await post(h, path, center(h, "wuxing-committee"), body, 403)
    r = await h.client.post(path, headers=h.auth("supervisor", "area:huannan"),
                            json={"department": "dinghai-roads", "reason": "x"})
    assert r.status_code == 200, r.text  # dinghai-roads serves dinghai, hence wuxing below it
    r = await h.client.post(f"/v1/tasks/{iid}-2/reassign", headers=h.auth("supervisor", "area:huannan"),
                            json={"department": "dinghai-roads", "reason": "x"})
    assert r.status_code == 422 and "department" in r.text, r.text  # already with it
    out = await post(h, f"/v1/tasks/{iid}-2/reassign", h.auth("supervisor", "area:huannan", "sup:li"), body)
    assert out["status"] == "superseded" and out["reassigned_to"] == f"{iid}-3"
    state = await issue(h, iid)
    assert [(t["department"], t["status"]) for t in state["tasks"]] == [
        ("wuxing-committee", "superseded"), ("dinghai-roads", "superseded"), ("huannan-center", "dispatched")]
    await router_idle(h)
    evs = await events(h, iid)
    moves = of_type(evs, REASSIGNED)
    assert [(e["data"]["from_department"], e["data"]["to_department"]) for e in moves] == [
        ("wuxing-committee", "dinghai-roads"), ("dinghai-roads", "huannan-center")]
    assert moves[1]["data"]["by"] == "sup:li" and moves[1]["data"]["reason"] == "a street-wide matter"
    assert moves[1]["data"]["clocks"] == "restart"
    assert [e["data"]["reason"] for e in of_type(evs, SUPERSEDED)][-1] == "reassigned to huannan-center: " \
                                                                         "a street-wide matter"
    new = state["tasks"][2]
    assert ts(new["dispatched_at"]) > ts(lead["dispatched_at"])
    assert ts(new["resolve_due"]) - ts(new["dispatched_at"]) == timedelta(hours=1)  # restarted


# -- 缓办 --------------------------------------------------------------------------------------------------------
async def test_suspension_holds_the_clocks_and_resume_gives_back_the_time_left(
        needle_factory: Callable[..., Any]) -> None:
    h = await control_needle(needle_factory)
    iid = await report(h, "care_home")  # 12 s clocks (warning at 6 s): they would breach during the test
    (lead,) = (await dispatched(h, iid))["tasks"]
    await task_call(h, lead, "acknowledge")
    until = now() + timedelta(seconds=5)
    asked = await task_call(h, lead, "suspend", {"reason": "waiting for the court", "until": until.isoformat()})
    assert asked["suspension_requested"] is not None and not asked["suspended"]
    path = f"/v1/tasks/{lead['id']}/suspend/approve"
    await post(h, path, h.auth("supervisor", "area:wuxing-g1"), None, 403)
    out = await post(h, path, center(h, "huannan-center"))
    assert out["suspended"] and ts(out["suspended_until"]) == until
    assert ts(out["issue"]["suspended_until"]) == until
    paused_at = now()
    left = ts(lead["resolve_due"]) - paused_at
    assert left > timedelta(seconds=6), "the machine was too slow to suspend before the warning"

    await sleep_until(ts(lead["resolve_due"]) + timedelta(seconds=2))  # the old clock ran out meanwhile
    await router_idle(h)
    evs = await events(h, iid)
    assert of_type(evs, WARNED) == [] and of_type(evs, BREACHED) == [] and of_type(evs, ESCALATED) == []
    (review,) = of_type(evs, REVIEW_DUE)  # the reminder at the review date (a durable timer)
    assert ts(review["time"]) >= until

    resumed = await task_call(h, lead, "resume")
    resumed_at = now()
    assert not resumed["suspended"] and resumed["suspensions"] == 1
    new_due = ts(resumed["resolve_due"])
    assert resumed_at + left - timedelta(seconds=2) <= new_due <= resumed_at + left + timedelta(seconds=1)
    assert resumed["suspended_for"] > 5
    await post(h, f"/v1/tasks/{lead['id']}/resume", center(h, "huannan-center"), None, 409)  # not suspended now
    # care_home allows one suspension (suspension.max_count: 1)
    r = await h.client.post(f"/v1/tasks/{lead['id']}/suspend", headers=center(h, "wuxing-committee"),
                            json={"reason": "again", "until": (now() + timedelta(days=1)).isoformat()})
    assert r.status_code == 409 and "suspension.max_count" in r.text, r.text
    # the clock runs again: it breaches at the new due time
    await sleep_until(new_due + timedelta(seconds=2))
    await router_idle(h)
    evs = await events(h, iid)
    assert len(of_type(evs, BREACHED, task_id=lead["id"], clock="resolve")) == 1
    assert len(of_type(evs, SUSPENDED)) == 1 and len(of_type(evs, RESUMED)) == 1


async def test_suspension_cap_and_refusal(needle_factory: Callable[..., Any]) -> None:
    h = await control_needle(needle_factory)
    iid = await report(h, "pothole")  # suspension {max: P30D, max_count: 2}
    lead = lead_at(await dispatched(h, iid, 2), "district")
    r = await h.client.post(f"/v1/tasks/{lead['id']}/suspend", headers=center(h, "dinghai-roads"),
                            json={"reason": "winter", "until": (now() + timedelta(days=31)).isoformat()})
    assert r.status_code == 409 and "suspension.max" in r.text, r.text
    co = body_co = (await issue(h, iid))["tasks"][1]
    assert body_co["role"] == "co"
    r = await h.client.post(f"/v1/tasks/{co['id']}/suspend", headers=center(h, "dinghai-police"),
                            json={"reason": "x", "until": (now() + timedelta(days=1)).isoformat()})
    assert r.status_code == 409, r.text  # the lead asks
    await task_call(h, lead, "suspend", {"reason": "winter", "until": (now() + timedelta(days=20)).isoformat()})
    out = await post(h, f"/v1/tasks/{lead['id']}/suspend/reject", h.auth("supervisor", "area:dinghai"),
                     {"reason": "fill it now"})
    assert out["suspension_requested"] is None and not out["suspended"]
    await router_idle(h)
    assert len(of_type(await events(h, iid), "needle.task.suspension_rejected.v1")) == 1


# -- 延期 --------------------------------------------------------------------------------------------------------
async def test_extension_refused_and_capped(needle_factory: Callable[..., Any]) -> None:
    h = await control_needle(needle_factory)
    iid = await report(h, "pothole")  # owner area dinghai; extension {max: PT1H, max_count: 1}
    lead = lead_at(await dispatched(h, iid, 2), "district")
    await task_call(h, lead, "extension", {"extension": "PT30M", "reason": "asphalt"})
    # only a supervisor whose scope covers the owner area (dinghai) decides: the street's may not
    await post(h, f"/v1/tasks/{lead['id']}/extension/approve", h.auth("supervisor", "area:huannan"), None, 403)
    await post(h, f"/v1/tasks/{lead['id']}/extension/reject", h.auth("supervisor", "area:huannan"),
               {"reason": "no"}, 403)
    out = await post(h, f"/v1/tasks/{lead['id']}/extension/reject", h.auth("supervisor", "area:dinghai"),
                     {"reason": "the road is dangerous"})
    assert out["extension_requested"] is None and out["extensions"] == 0
    assert out["resolve_due"] == lead["resolve_due"]
    r = await h.client.post(f"/v1/tasks/{lead['id']}/extension", headers=center(h, "dinghai-roads"),
                            json={"extension": "PT2H", "reason": "more"})
    assert r.status_code == 409 and "extension.max" in r.text, r.text
    await task_call(h, lead, "extension", {"extension": "PT1H", "reason": "asphalt"})
    out = await post(h, f"/v1/tasks/{lead['id']}/extension/approve", h.auth("supervisor", "area:city"))
    assert out["extensions"] == 1 and ts(out["resolve_due"]) == ts(lead["resolve_due"]) + timedelta(hours=1)
    r = await h.client.post(f"/v1/tasks/{lead['id']}/extension", headers=center(h, "dinghai-roads"),
                            json={"extension": "PT10M", "reason": "more"})
    assert r.status_code == 409 and "extension.max_count" in r.text, r.text
    await router_idle(h)
    evs = await events(h, iid)
    assert len(of_type(evs, EXT_REJECTED)) == 1 and len(of_type(evs, EXT_APPROVED)) == 1


# -- exactly once across a router restart ------------------------------------------------------------------------
class DispatchRouters(Routers):
    """``needle run router`` subprocesses on dispatch_rules.yaml."""

    rules = RULES


@pytest.fixture
def dispatch_routers(tmp_path: Path) -> Iterator[DispatchRouters]:
    r = DispatchRouters(tmp_path / "routers")
    r.root.mkdir()
    yield r
    r.close()


@pytest.mark.slow  # restart/fault or bench smoke: `pytest -m slow`
async def test_each_path_records_its_events_exactly_once_across_a_router_restart(
        needle_factory: Callable[..., Any], dispatch_routers: DispatchRouters) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES, services=("intake",))
    assert h.stack.nc is not None
    h.stack.nc.options["drain_timeout"] = 2
    js = h.stack.nc.jetstream()
    await precreate_router_consumers(js)
    router = dispatch_routers.start(h.stack.urls.nats)
    try:
        care = await report(h, "care_home")
        dogs = await report(h, "stray_dogs")
        noise = await report(h, "noise_complaint")
        (lead,) = (await dispatched(h, care))["tasks"]
        (dog_lead,) = (await dispatched(h, dogs))["tasks"]
        (noise_lead,) = (await dispatched(h, noise))["tasks"]
        await task_call(h, lead, "acknowledge")
        until = now() + timedelta(seconds=6)
        await task_call(h, lead, "suspend", {"reason": "court", "until": until.isoformat()})
        await post(h, f"/v1/tasks/{lead['id']}/suspend/approve", center(h, "huannan-center"))
        await task_call(h, dog_lead, "return", {"reason": "the district's"})
        await post(h, f"/v1/tasks/{dog_lead['id']}/return/approve", center(h, "dinghai-center"))
        await post(h, f"/v1/tasks/{noise_lead['id']}/reassign", center(h, "huannan-center"),
                   {"department": "huannan-center", "reason": "street-wide"})
        dispatch_routers.kill(router)  # killed with the cues (approval, return) perhaps fetched, not acked
        router = dispatch_routers.start(h.stack.urls.nats)
        await h.wait_for(f"/v1/issues/{dogs}", h.auth("admin"), lambda b: b["level"] == "district", 20)
        await sleep_until(until + timedelta(seconds=2))
        await poll(lambda: _has(h, care, REVIEW_DUE), 15, "the review reminder")
        resumed = await task_call(h, lead, "resume")
        dispatch_routers.kill(router)  # the resumed clock's timer is set from the event by the next router
        router = dispatch_routers.start(h.stack.urls.nats)
        await sleep_until(ts(resumed["resolve_due"]) + timedelta(seconds=2))
        await poll(lambda: _has(h, care, BREACHED), 20, "the breach of the resumed clock")
        await poll(lambda: router_idle_js(js), 20, "the router consumer to drain")
        assert router.poll() is None, dispatch_routers.logs()
    except AssertionError:
        print(dispatch_routers.logs())
        raise
    evs = await events(h, care)
    assert len(of_type(evs, SUSPENDED)) == 1 and len(of_type(evs, REVIEW_DUE)) == 1
    assert len(of_type(evs, RESUMED)) == 1 and len(of_type(evs, BREACHED, clock="resolve")) == 1
    assert len(of_type(evs, WARNED, clock="resolve")) == 1 and len(of_type(evs, ESCALATED)) == 1  # the breach
    evs = await events(h, dogs)
    assert len(of_type(evs, RETURN_APPROVED)) == 1 and len(of_type(evs, ESCALATED)) == 1
    assert len(of_type(evs, "needle.issue.routed.v1")) == 2 and len(of_type(evs, DISPATCHED)) == 2
    evs = await events(h, noise)
    assert len(of_type(evs, REASSIGNED)) == 1 and len(of_type(evs, DISPATCHED)) == 2
    assert len(of_type(evs, SUPERSEDED)) == 1


@pytest.mark.slow  # restart/fault or bench smoke: `pytest -m slow`
async def test_info_pause_and_progress_warnings_exactly_once_across_router_restarts(
        needle_factory: Callable[..., Any], dispatch_routers: DispatchRouters) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES, services=("intake",))
    assert h.stack.nc is not None
    h.stack.nc.options["drain_timeout"] = 2
    js = h.stack.nc.jetstream()
    await precreate_router_consumers(js)
    router = dispatch_routers.start(h.stack.urls.nats)
    path = lambda i: f"/v1/issues/{i}/comments"  # noqa: E731
    try:
        care = await report(h, "care_home")  # info_request pauses; 12 s clocks
        permit = await report(h, "permit")  # progress every 3 s
        (lead,) = (await dispatched(h, care))["tasks"]
        await dispatched(h, permit)
        await task_call(h, lead, "acknowledge")
        await post(h, path(care), center(h, "wuxing-committee"), {"text": "请补充", "kind": "info_request"}, 201)
        dispatch_routers.kill(router)  # the timers pending, the pause's cue perhaps fetched, not acked
        router = dispatch_routers.start(h.stack.urls.nats)
        await sleep_until(ts(lead["resolve_due"]) + timedelta(seconds=1))  # the old clock ran out while held
        await poll(lambda: _count(h, permit, PROGRESS_MISSED, 2), 20, "two missed progress reports")
        reply = await post(h, path(care), h.auth("grid_worker", "area:wuxing-g1"),
                           {"text": "已补充", "kind": "info_reply"}, 201)
        dispatch_routers.kill(router)  # the resumed clocks' timer is set from the event by the next router
        router = dispatch_routers.start(h.stack.urls.nats)
        resumed = (await issue(h, care))["tasks"][0]
        assert ts(resumed["resolve_due"]) > ts(reply["at"])
        await sleep_until(ts(resumed["resolve_due"]) + timedelta(seconds=2))
        await poll(lambda: _has(h, care, BREACHED), 20, "the breach of the resumed clock")
        await poll(lambda: router_idle_js(js), 20, "the router consumer to drain")
        assert router.poll() is None, dispatch_routers.logs()
    except AssertionError:
        print(dispatch_routers.logs())
        raise
    evs = await events(h, care)
    assert len(of_type(evs, CLOCKS_PAUSED)) == 1 and len(of_type(evs, CLOCKS_RESUMED)) == 1
    assert len(of_type(evs, BREACHED, clock="resolve")) == 1 and len(of_type(evs, WARNED, clock="resolve")) == 1
    assert all(ts(e["time"]) > ts(reply["at"]) for e in of_type(evs, WARNED) + of_type(evs, BREACHED))
    missed = of_type(await events(h, permit), PROGRESS_MISSED)
    dues = [ts(e["data"]["due"]) for e in missed]
    assert len(dues) >= 2 and len(set(dues)) == len(dues)  # each period warned once
    assert all(b - a == timedelta(seconds=3) for a, b in itertools.pairwise(dues))


async def _has(h: NeedleHandle, issue_id: str, ce_type: str) -> bool:
    return bool(of_type(await events(h, issue_id), ce_type))


# -- comments and progress reports ---------------------------------------------------------------------------------
async def test_comments_are_visible_to_each_participant_and_refused_to_others(
        needle_factory: Callable[..., Any]) -> None:
    h = await control_needle(needle_factory)
    iid = await report(h, "pothole")  # grid wuxing-g1; owner dinghai; lead dinghai-roads, co dinghai-police
    lead = lead_at(await dispatched(h, iid, 2), "district")
    participants = {
        "grid worker": h.auth("grid_worker", "area:wuxing-g1"), "lead": center(h, "dinghai-roads"),
        "co-handler": center(h, "dinghai-police"), "command centre": center(h, "city-center"),
        "supervisor": h.auth("supervisor", "area:huannan"),
    }
    others = {"other grid": h.auth("grid_worker", "area:wuxing-g2"), "no task": center(h, "wuxing-committee"),
              "street centre below the owner area": center(h, "huannan-center"),
              "supervisor of another grid": h.auth("supervisor", "area:wuxing-g2")}
    path = f"/v1/issues/{iid}/comments"
    for who, headers in participants.items():
        out = await post(h, path, headers, {"text": f"from the {who}"}, 201)
        assert out["kind"] == "comment" and out["text"] == f"from the {who}"
    progress = await post(h, path, participants["lead"], {"text": "half done", "kind": "progress",
                                                          "media": ["photos/1.jpg"]}, 201)
    assert progress["task_id"] == lead["id"] and progress["department"] == "dinghai-roads"
    await post(h, path, participants["co-handler"], {"text": "x", "kind": "progress"}, 409)  # the lead reports
    for who, headers in others.items():
        r = await h.client.post(path, headers=headers, json={"text": "x"})
        assert r.status_code == 403, (who, r.text)
        r = await h.client.get(path, headers=headers)
        assert r.status_code == 403, (who, r.text)
    for who, headers in participants.items():
        r = await h.client.get(path, headers=headers)
        assert r.status_code == 200, (who, r.text)
        assert [c["text"] for c in r.json()["items"]] == [f"from the {w}" for w in participants] + ["half done"]
    r = await h.client.post(path, headers=participants["lead"], json={"text": "x", "kind": "gossip"})
    assert r.status_code == 422 and "kind" in r.text
    evs = of_type(await events(h, iid), "needle.issue.comment_added.v1")
    assert len(evs) == 6 and evs[-1]["data"]["media"] == ["photos/1.jpg"]


# -- 补充材料: an info request pauses the clock until the reply -------------------------------------------------------
async def test_an_info_request_pauses_the_clock_until_the_reply(needle_factory: Callable[..., Any]) -> None:
    h = await control_needle(needle_factory)
    iid = await report(h, "care_home")  # 12 s clocks (warning at 6 s), info_request: {pauses: true}
    (lead,) = (await dispatched(h, iid))["tasks"]
    path = f"/v1/issues/{iid}/comments"
    grid_worker = h.auth("grid_worker", "area:wuxing-g1")
    await post(h, path, grid_worker, {"text": "a plain comment", "kind": "info_request"}, 201)  # not the lead's
    await post(h, path, center(h, "wuxing-committee"), {"text": "a plain comment"}, 201)
    assert of_type(await events(h, iid), CLOCKS_PAUSED) == []
    asked = await post(h, path, center(h, "wuxing-committee"), {"text": "请补充房屋照片", "kind": "info_request"}, 201)
    paused_at = ts(asked["at"])
    left = ts(lead["resolve_due"]) - paused_at
    ack_left = ts(lead["acknowledge_due"]) - paused_at
    assert left > timedelta(seconds=6), "the machine was too slow to ask before the warning"
    body = await issue(h, iid)
    assert ts(body["tasks"][0]["info_paused_at"]) == paused_at
    await post(h, path, center(h, "wuxing-committee"), {"text": "还有吗", "kind": "info_request"}, 201)  # held already
    await post(h, path, center(h, "wuxing-committee"), {"text": "not the grid worker", "kind": "info_reply"}, 201)

    await sleep_until(ts(lead["resolve_due"]) + timedelta(seconds=2))  # the old clocks ran out meanwhile
    await router_idle(h)
    evs = await events(h, iid)
    assert of_type(evs, WARNED) == [] and of_type(evs, BREACHED) == [] and of_type(evs, ESCALATED) == []
    assert len(of_type(evs, CLOCKS_PAUSED)) == 1 and of_type(evs, CLOCKS_RESUMED) == []

    reply = await post(h, path, grid_worker, {"text": "照片已上传", "kind": "info_reply"}, 201)
    resumed_at = ts(reply["at"])
    task = (await issue(h, iid))["tasks"][0]
    assert task["info_paused_at"] is None and task["status"] == "dispatched"
    assert ts(task["resolve_due"]) == resumed_at + left  # natural clock: exactly the time that was left
    assert ts(task["acknowledge_due"]) == resumed_at + ack_left
    (resumed,) = of_type(await events(h, iid), CLOCKS_RESUMED)
    assert resumed["data"]["cause"] == "info_request" and ts(resumed["data"]["resolve_due"]) == resumed_at + left
    await post(h, path, grid_worker, {"text": "one more", "kind": "info_reply"}, 201)  # nothing held: a comment
    await task_call(h, lead, "acknowledge")  # (else its acknowledge breach escalates first)
    # the clocks run again: they warn and breach at the new times, once
    await sleep_until(ts(task["resolve_due"]) + timedelta(seconds=2))
    await router_idle(h)
    evs = await events(h, iid)
    assert len(of_type(evs, BREACHED, task_id=lead["id"], clock="resolve")) == 1
    assert len(of_type(evs, WARNED, task_id=lead["id"], clock="resolve")) == 1
    assert len(of_type(evs, CLOCKS_PAUSED)) == 1 and len(of_type(evs, CLOCKS_RESUMED)) == 1
    assert min(ts(e["time"]) for e in of_type(evs, WARNED)) > resumed_at


async def test_an_info_request_does_not_pause_without_the_rule(needle_factory: Callable[..., Any]) -> None:
    h = await control_needle(needle_factory)
    iid = await report(h, "noise_complaint")  # no info_request rule: the clocks keep running
    (lead,) = (await dispatched(h, iid))["tasks"]
    await post(h, f"/v1/issues/{iid}/comments", center(h, "wuxing-committee"),
               {"text": "请补充", "kind": "info_request"}, 201)
    body = await issue(h, iid)
    assert body["tasks"][0]["info_paused_at"] is None
    assert body["tasks"][0]["resolve_due"] == lead["resolve_due"]
    assert of_type(await events(h, iid), CLOCKS_PAUSED) == []


# -- 阶段性答复: a missing progress report warns ---------------------------------------------------------------------
async def test_a_missing_progress_report_warns_and_a_report_restarts_the_period(
        needle_factory: Callable[..., Any]) -> None:
    h = await control_needle(needle_factory)
    iid = await report(h, "permit")  # progress_every: PT3S, clocks of an hour
    (lead,) = (await dispatched(h, iid))["tasks"]
    first_due = ts(lead["dispatched_at"]) + timedelta(seconds=3)
    await poll(lambda: _count(h, iid, PROGRESS_MISSED, 1), 10, "the first missed progress report")
    (missed,) = of_type(await events(h, iid), PROGRESS_MISSED)
    assert missed["data"]["task_id"] == lead["id"] and ts(missed["data"]["due"]) == first_due
    assert ts((await issue(h, iid))["tasks"][0]["progress_missed"]) == first_due
    await sleep_until(first_due + timedelta(seconds=1.5))
    progress = await post(h, f"/v1/issues/{iid}/comments", center(h, "wuxing-committee"),
                          {"text": "材料已收齐", "kind": "progress"}, 201)
    reported_at = ts(progress["at"])
    assert ts((await issue(h, iid))["tasks"][0]["progress_at"]) == reported_at
    # the period restarts at the report: nothing at first_due + 3 s, the next warning at reported_at + 3 s
    await sleep_until(first_due + timedelta(seconds=3.5))
    await router_idle(h)
    assert len(of_type(await events(h, iid), PROGRESS_MISSED)) == 1
    await poll(lambda: _count(h, iid, PROGRESS_MISSED, 2), 10, "the next missed progress report")
    second = of_type(await events(h, iid), PROGRESS_MISSED)[1]
    assert ts(second["data"]["due"]) == reported_at + timedelta(seconds=3)
    assert ts(second["time"]) >= reported_at + timedelta(seconds=3)
    await task_call(h, lead, "acknowledge")
    await task_call(h, lead, "resolve", {"note": "许可已发"})
    await asyncio.sleep(4)  # a resolved task is asked for nothing more
    await router_idle(h)
    evs = await events(h, iid)
    resolved_at = ts(of_type(evs, "needle.task.resolved.v1")[0]["time"])
    assert all(ts(e["time"]) <= resolved_at for e in of_type(evs, PROGRESS_MISSED))
    assert of_type(evs, WARNED) == []  # a missed report is its own event, not an SLA warning


# -- 催办 and 督办 count -------------------------------------------------------------------------------------------
async def test_urge_and_supervision_counts_in_stats(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES)  # with the projections
    one, two = await report(h, "noise_complaint"), await report(h, "pothole")
    (lead1,) = (await dispatched(h, one))["tasks"]
    lead2 = lead_at(await dispatched(h, two, 2), "district")
    sup = h.auth("supervisor", "area:huannan")
    for iid in (one, one, two):
        await post(h, f"/v1/issues/{iid}/urge", h.auth("supervisor", "area:wuxing-g1"), {"note": "快"})
    # an urge naming a task counts against that task's department (here the co-handler), not the lead's
    co2 = next(t for t in (await issue(h, two))["tasks"] if t["role"] == "co")
    urged = await post(h, f"/v1/issues/{two}/urge", h.auth("supervisor", "area:wuxing-g1"),
                       {"note": "配合", "task": co2["id"]})
    assert [t["urges"] for t in urged["tasks"]] == [1, 1]
    r = await h.client.post(f"/v1/issues/{two}/urge", headers=h.auth("supervisor", "area:wuxing-g1"),
                            json={"task": f"{one}-1"})
    assert r.status_code == 404 and "task" in r.text, r.text
    r = await h.client.post(f"/v1/issues/{two}/urge", headers=h.auth("supervisor", "area:wuxing-g1"),
                            json={"task": "bad task!"})
    assert r.status_code == 422 and "task" in r.text, r.text
    (named,) = of_type(await events(h, two), "needle.issue.urged.v1", task_id=co2["id"])
    assert named["data"]["note"] == "配合"
    # 督办: a short due date with reminders every second; the first task is resolved in time, the second late
    due1, due2 = now() + timedelta(seconds=30), now() + timedelta(seconds=3)
    out = await post(h, f"/v1/tasks/{lead1['id']}/supervise", sup,
                     {"due": due1.isoformat(), "reason": "反复投诉", "remind_every": "PT1S"})
    assert ts(out["supervised_due"]) == due1
    await post(h, f"/v1/tasks/{lead2['id']}/supervise", sup, {"due": due2.isoformat(), "reason": "x"}, 403)  # dinghai
    await post(h, f"/v1/tasks/{lead2['id']}/supervise", center(h, "dinghai-center"),
               {"due": due2.isoformat(), "reason": "道路安全", "remind_every": "PT2S"})
    await poll(lambda: _count(h, one, "needle.task.supervision_reminded.v1", 2), 10, "two reminders")
    await task_call(h, lead1, "resolve", {"note": "done"})
    await sleep_until(due2 + timedelta(seconds=1))
    r = await h.client.post(f"/v1/tasks/{lead2['id']}/resolve", headers=center(h, "dinghai-roads"), json={"note": "x"})
    assert r.status_code == 200, r.text
    seq = r.headers["Needle-Seq"]
    await router_idle(h)
    reminders = of_type(await events(h, one), "needle.task.supervision_reminded.v1")
    assert reminders and all(ts(b["data"]["at"]) - ts(a["data"]["at"]) == timedelta(seconds=1)
                             for a, b in itertools.pairwise(reminders))
    resolved_at = ts(of_type(await events(h, one), "needle.task.resolved.v1")[0]["time"])
    assert all(ts(e["time"]) <= resolved_at + timedelta(seconds=1) for e in reminders)  # they stop
    r = await h.client.get("/v1/stats", params={"area": "dinghai"},
                           headers=h.auth("admin") | {"Needle-Min-Seq": seq})
    assert r.status_code == 200, r.text
    stats = r.json()
    overall = stats["overall"]["counts"]
    assert (overall["urged"], overall["supervised"], overall["supervision_closed"], overall["supervised_on_time"]) \
        == (4, 2, 2, 1)
    assert stats["overall"]["rates"]["supervision_on_time_rate"]["value"] == 0.5
    depts = stats["departments"]
    assert depts["wuxing-committee"]["counts"]["urged"] == 2 and depts["dinghai-roads"]["counts"]["urged"] == 1
    assert depts["dinghai-police"]["counts"]["urged"] == 1
    assert depts["wuxing-committee"]["rates"]["supervision_on_time_rate"]["value"] == 1.0
    assert depts["dinghai-roads"]["rates"]["supervision_on_time_rate"]["value"] == 0.0
    body = await issue(h, one)
    assert body["tasks"][0]["urges"] == 2


async def _count(h: NeedleHandle, issue_id: str, ce_type: str, n: int) -> bool:
    return len(of_type(await events(h, issue_id), ce_type)) >= n


# -- fair rates: /v1/stats equals a recount from the raw events ------------------------------------------------------
def recount(histories: list[list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
    """Each department's 响应率 and 解决率 counts, from the raw events alone (the formulas of the README): a task's
    acknowledge (resolve) clock is judged once, at its acknowledgement (resolution) or at its breach, whichever
    comes first; on time when acknowledged by its acknowledge due. Plus the area's lead-task 响应率."""
    out: dict[str, dict[str, int]] = {}
    for evs in histories:
        tasks: dict[str, dict[str, Any]] = {}
        for e in evs:
            d, kind = e["data"], e["type"].split(".")[-2]
            if kind == "dispatched":
                tasks[d["task_id"]] = d | {"judged": set()}
                continue
            t = tasks.get(d.get("task_id", ""))
            if t is None:
                continue
            c = out.setdefault(t["department"], dict.fromkeys(
                ("ack_on_time", "ack_due", "resolved", "resolve_due", "lead_ack_on_time", "lead_ack_due"), 0))
            clock = {"acknowledged": "acknowledge", "resolved": "resolve"}.get(kind)
            if kind == "breached":
                clock = d["clock"]
            if clock is None or clock in t["judged"]:
                if kind == "resolved":
                    c["resolved"] += 1
                continue
            t["judged"].add(clock)
            lead = t["role"] == "lead"
            if clock == "acknowledge":
                c["ack_due"] += 1
                c["lead_ack_due"] += lead
                if kind == "acknowledged" and ts(d["at"]) <= ts(t["acknowledge_due"]):
                    c["ack_on_time"] += 1
                    c["lead_ack_on_time"] += lead
            else:
                c["resolve_due"] += 1
                c["resolved"] += kind == "resolved"
    return out


def recount_area(histories: list[list[dict[str, Any]]]) -> tuple[int, int]:
    """The area's 解决率 from the raw events (the README's formula): ``issues_resolved / issues_resolve_due``, each
    issue counted at most once in each — resolved when a lead task of it resolved; due the first time a lead task's
    resolve clock was met or breached (not yet due, or superseded before it ran out: in neither)."""
    resolved = due = 0
    for evs in histories:
        leads = {e["data"]["task_id"] for e in evs
                 if e["type"] == "needle.task.dispatched.v1" and e["data"]["role"] == "lead"}
        judged = [e for e in evs if e["data"].get("task_id") in leads and (
            e["type"] == "needle.task.resolved.v1"
            or (e["type"] == BREACHED and e["data"]["clock"] == "resolve"))]
        due += bool(judged)
        resolved += any(e["type"] == "needle.task.resolved.v1" for e in judged)
    return resolved, due


async def test_stats_rates_equal_a_recount_from_the_raw_events(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES)
    on_time = await report(h, "noise_complaint")  # acknowledged at once, then resolved
    not_due = await report(h, "pothole")  # nobody acts: not yet due, in no denominator
    escalated = await report(h, "pothole")  # superseded by a requested escalation before any clock ran out
    breached = await report(h, "road_damage")  # 3 s acknowledge clock: breaches, escalates, breaches at the city
    moved = await report(h, "noise_complaint")  # reassigned: the old task superseded before its clock ran out
    (t1,) = (await dispatched(h, on_time))["tasks"]
    await task_call(h, t1, "acknowledge")
    await task_call(h, t1, "resolve", {"note": "quiet now"})
    await dispatched(h, not_due, 2)
    await dispatched(h, escalated, 2)
    await post(h, f"/v1/issues/{escalated}/escalate", h.auth("grid_worker", "area:wuxing-g1"), {"reason": "x"}, 202)
    (t5,) = (await dispatched(h, moved))["tasks"]
    await post(h, f"/v1/tasks/{t5['id']}/reassign", center(h, "huannan-center"),
               {"department": "huannan-center", "reason": "street"})
    await h.wait_for(f"/v1/issues/{breached}", h.auth("admin"), lambda b: any(
        t["level"] == "city" and "resolve" in t["breached"] for t in b["tasks"]), 30)
    city_lead = lead_at(await issue(h, breached), "city")
    await task_call(h, city_lead, "acknowledge")  # late: judged at its breach already
    await router_idle(h)
    histories = [await events(h, i) for i in (on_time, not_due, escalated, breached, moved)]
    last = max(e["sequence"] for evs in histories for e in evs)
    r = await h.client.get("/v1/stats", params={"area": "city"},
                           headers=h.auth("admin") | {"Needle-Min-Seq": str(last)})
    assert r.status_code == 200, r.text
    stats = r.json()
    expected = recount(histories)
    assert expected["wuxing-committee"]["ack_due"] == 1 and expected["dinghai-roads"]["ack_due"] == 1  # the edges
    assert expected["dinghai-police"]["ack_due"] == 1  # road_damage's co-handler breached; pothole's superseded
    for dept, c in expected.items():
        got = stats["departments"][dept]["rates"]
        assert (got["response_rate"]["numerator"], got["response_rate"]["denominator"]) == \
            (c["ack_on_time"], c["ack_due"]), dept
        assert (got["resolution_rate"]["numerator"], got["resolution_rate"]["denominator"]) == \
            (c["resolved"], c["resolve_due"]), dept
        value = got["response_rate"]["value"]
        assert value == (round(c["ack_on_time"] / c["ack_due"], 4) if c["ack_due"] else None), dept
    overall = stats["overall"]["rates"]["response_rate"]
    assert (overall["numerator"], overall["denominator"]) == (
        sum(c["lead_ack_on_time"] for c in expected.values()), sum(c["lead_ack_due"] for c in expected.values()))
    # the area's 解决率: on_time resolved, breached judged at its resolve breach; the rest not due or superseded
    area = stats["overall"]["rates"]["resolution_rate"]
    assert (area["numerator"], area["denominator"]) == recount_area(histories) == (1, 2)
    assert stats["overall"]["counts"]["issues_dispatched"] == 5
