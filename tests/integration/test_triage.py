"""受理 on real servers: a category under review waits for the command centre; accept, reject (不予受理),
void (作废) and recategorise (改类) each record one event, are idempotent under retries and answer 409 once a
task has been acknowledged; an accepted report is dispatched exactly once across a router restart."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import NeedleHandle, events, issue

FIXTURES = Path(__file__).parents[1] / "fixtures"
ORG, RULES = FIXTURES / "evidence_org.yaml", FIXTURES / "evidence_rules.yaml"
G1 = ("grid_worker", "area:wuxing-g1")
CENTRE = ("handler", "dept:huannan-center")  # the command centre serving wuxing (its street's)
DISTRICT_CENTRE = ("handler", "dept:dinghai-center")  # road_damage starts at the district
SUP = ("supervisor", "area:huannan")
ROADS = ("handler", "dept:dinghai-roads")


@pytest.fixture
async def h(needle_factory: Callable[..., Any]) -> NeedleHandle:
    handle: NeedleHandle = await needle_factory(ORG, RULES)
    return handle


async def report(h: NeedleHandle, category: str, title: str = "t") -> str:
    r = await h.client.post("/v1/issues", headers=h.auth(*G1),
                            json={"grid": "wuxing-g1", "category": category, "title": title})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def dispatched(h: NeedleHandle, category: str = "road_damage") -> dict[str, Any]:
    iid = await report(h, category)
    body: dict[str, Any] = await h.wait_for(f"/v1/issues/{iid}", h.auth("admin"), lambda b: len(b["tasks"]) >= 1)
    return body


async def act(h: NeedleHandle, iid: str, verb: str, who: tuple[str, str], body: Any = None) -> httpx.Response:
    return await h.client.post(f"/v1/issues/{iid}/{verb}", headers=h.auth(*who), json=body)


def types(evs: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("needle.").removesuffix(".v1") for e in evs]


async def settled(h: NeedleHandle) -> None:
    """The router has seen everything before this: a later report got its dispatch."""
    await dispatched(h)


async def test_review_holds_dispatch_until_the_command_centre_accepts(h: NeedleHandle) -> None:
    iid = await report(h, "complaint", "楼道堆物")
    await settled(h)
    held = await issue(h, iid)
    assert (held["status"], held["tasks"]) == ("pending_review", [])
    seen = await h.client.get(f"/v1/issues/{iid}", headers=h.auth(*CENTRE))  # the command centre reads it
    assert seen.status_code == 200 and seen.json()["status"] == "pending_review"
    assert (await h.client.get(f"/v1/issues/{iid}", headers=h.auth(*ROADS))).status_code == 403
    assert (await act(h, iid, "accept", G1)).status_code == 403  # not the grid worker's call
    assert (await act(h, iid, "accept", ROADS)).status_code == 403  # nor another department's
    r = await act(h, iid, "accept", CENTRE, {"reason": "属实"})
    assert r.status_code == 200 and r.json()["status"] == "reported", r.text
    body = await h.wait_for(f"/v1/issues/{iid}", h.auth("admin"), lambda b: len(b["tasks"]) == 1)
    assert body["tasks"][0]["department"] == "wuxing-committee"
    again = await act(h, iid, "accept", CENTRE, {"reason": "属实"})  # a retry: nothing more recorded
    assert again.status_code == 200
    evs = types(await events(h, iid))
    assert evs.count("issue.accepted") == 1 and evs.count("task.dispatched") == 1


async def test_reject_and_void_record_one_event_each_and_the_grid_worker_sees_why(h: NeedleHandle) -> None:
    iid = await report(h, "complaint")
    for _ in range(2):  # the retry records nothing and answers the same
        r = await act(h, iid, "reject", SUP, {"reason": "不属于政府职责范围"})
        assert r.status_code == 200 and r.json()["status"] == "rejected", r.text
    seen = (await h.client.get(f"/v1/issues/{iid}", headers=h.auth(*G1))).json()
    assert (seen["triage"]["decision"], seen["triage"]["reason"]) == ("rejected", "不属于政府职责范围")
    assert types(await events(h, iid)) == ["issue.reported", "issue.rejected"]
    listed = await h.wait_for("/v1/issues?area=wuxing&status=rejected", h.auth(*SUP) | {"Needle-Min-Seq": "0"},
                              lambda b: any(i["id"] == iid for i in b["items"]))  # the read model knows it
    assert listed
    assert (await act(h, iid, "void", SUP, {"reason": "x"})).status_code == 409
    assert (await act(h, iid, "accept", SUP)).status_code == 409

    body = await dispatched(h)  # auto intake: already dispatched, nothing acknowledged yet
    iid = body["id"]
    for _ in range(2):
        assert (await act(h, iid, "void", CENTRE, {"reason": "测试数据"})).status_code == 403  # not its owner
        r = await act(h, iid, "void", DISTRICT_CENTRE, {"reason": "测试数据"})
        assert r.status_code == 200 and r.json()["status"] == "voided", r.text
    got = await issue(h, iid)
    assert {t["status"] for t in got["tasks"]} == {"superseded"}
    assert types(await events(h, iid)).count("issue.voided") == 1
    assert (await h.client.post(f"/v1/tasks/{got['tasks'][0]['id']}/acknowledge", headers=h.auth(*ROADS))
            ).status_code == 409


async def test_recategorise_supersedes_the_tasks_and_routes_anew(h: NeedleHandle) -> None:
    body = await dispatched(h)  # road_damage: district, dinghai-roads leads
    iid, old = body["id"], {t["id"] for t in body["tasks"]}
    problem = await act(h, iid, "recategorise", DISTRICT_CENTRE, {"category": "nope", "reason": "x"})
    assert problem.status_code == 422 and problem.json()["field"] == "category"
    r = await act(h, iid, "recategorise", DISTRICT_CENTRE, {"category": "litter", "reason": "实为垃圾堆放"})
    assert r.status_code == 200, r.text
    after = await h.wait_for(f"/v1/issues/{iid}", h.auth("admin"),
                             lambda b: any(t["status"] == "dispatched" for t in b["tasks"]))
    assert after["category"] == "litter" and after["level"] == "community"
    assert {t["id"]: t["status"] for t in after["tasks"] if t["id"] in old} == dict.fromkeys(old, "superseded")
    new = [t for t in after["tasks"] if t["id"] not in old]
    assert [(t["department"], t["status"]) for t in new] == [("wuxing-committee", "dispatched")]
    again = await act(h, iid, "recategorise", SUP, {"category": "litter", "reason": "实为垃圾堆放"})
    assert again.status_code == 200
    evs = types(await events(h, iid))
    assert evs.count("issue.recategorised") == 1 and evs.count("issue.routed") == 2


async def test_every_decision_is_409_once_a_task_is_acknowledged(h: NeedleHandle) -> None:
    body = await dispatched(h)
    lead = next(t for t in body["tasks"] if t["role"] == "lead")
    assert (await h.client.post(f"/v1/tasks/{lead['id']}/acknowledge", headers=h.auth(*ROADS))).status_code == 200
    for verb, payload in (("reject", {"reason": "x"}), ("void", {"reason": "x"}), ("accept", None),
                          ("recategorise", {"category": "litter", "reason": "x"})):
        r = await act(h, body["id"], verb, SUP, payload)
        assert r.status_code == 409, (verb, r.text)


async def test_an_accepted_report_is_dispatched_once_across_a_router_restart(needle_factory: Callable[..., Any]
                                                                               ) -> None:
    h: NeedleHandle = await needle_factory(ORG, RULES, services=("intake",))
    iid = await report(h, "complaint")
    assert (await act(h, iid, "accept", CENTRE)).status_code == 200
    url = h.stack.urls.nats
    first: NeedleHandle = await needle_factory(ORG, RULES, nats_url=url, services=("router",))
    await h.wait_for(f"/v1/issues/{iid}", h.auth("admin"), lambda b: len(b["tasks"]) == 1)
    await first.close()
    second: NeedleHandle = await needle_factory(ORG, RULES, nats_url=url, services=("router",))
    other = await report(h, "road_damage")
    await h.wait_for(f"/v1/issues/{other}", h.auth("admin"), lambda b: len(b["tasks"]) >= 1)
    await asyncio.sleep(0.5)
    assert types(await events(h, iid)).count("task.dispatched") == 1
    assert second
