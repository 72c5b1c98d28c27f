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
    other = await report(h, "road_damage")
    for verb, payload in (("reject", {"reason": "x"}), ("void", {"reason": "x"}), ("accept", None),
                          ("recategorise", {"category": "litter", "reason": "x"}), ("merge", {"into": other})):
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


WARNED, BREACHED = "needle.review.warned.v1", "needle.review.breached.v1"


async def test_the_review_clock_warns_then_breaches_a_held_report_and_the_overdue_list_shows_it(
        h: NeedleHandle) -> None:
    iid = await report(h, "petition", "信访件")  # sla.review PT3S: warned at 2.4 s, breached at 3 s
    held = await issue(h, iid)
    assert held["status"] == "pending_review" and held["review"]["breached"] is False
    body = await h.wait_for(f"/v1/issues/{iid}", h.auth("admin"), lambda b: b["review"]["breached"], timeout=15)
    assert body["status"] == "pending_review" and body["tasks"] == []  # still held for the command centre
    evs = await events(h, iid)
    assert [e["type"] for e in evs if e["type"] in (WARNED, BREACHED)] == [WARNED, BREACHED]
    assert all(e["data"]["due"] == evs[0]["data"]["review_due"] for e in evs if e["type"] in (WARNED, BREACHED))

    async def overdue() -> list[dict[str, Any]]:
        r = await h.client.get("/v1/overdue", headers=h.auth(*SUP))
        assert r.status_code == 200, r.text
        return [row for row in r.json()["items"] if row["id"] == iid]

    for _ in range(100):
        if rows := await overdue():
            break
        await asyncio.sleep(0.1)
    assert rows and rows[0]["clock"] == "review", rows
    assert (await act(h, iid, "accept", CENTRE)).status_code == 200  # accepting stops the clock
    await h.wait_for(f"/v1/issues/{iid}", h.auth("admin"), lambda b: len(b["tasks"]) == 1)
    for _ in range(100):
        if not await overdue():
            break
        await asyncio.sleep(0.1)
    assert not await overdue()
    evs = types(await events(h, iid))
    assert evs.count("review.warned") == 1 and evs.count("review.breached") == 1


async def test_a_report_accepted_in_time_is_never_warned(h: NeedleHandle) -> None:
    iid = await report(h, "petition")
    assert (await act(h, iid, "accept", CENTRE)).status_code == 200
    await h.wait_for(f"/v1/issues/{iid}", h.auth("admin"), lambda b: len(b["tasks"]) == 1)
    await asyncio.sleep(4)  # past the review clock's due time
    evs = types(await events(h, iid))
    assert "review.warned" not in evs and "review.breached" not in evs


async def test_the_review_clock_fires_exactly_once_across_a_router_restart(needle_factory: Callable[..., Any]
                                                                             ) -> None:
    h: NeedleHandle = await needle_factory(ORG, RULES, services=("intake",))
    url = h.stack.urls.nats
    first: NeedleHandle = await needle_factory(ORG, RULES, nats_url=url, services=("router",))
    iid = await report(h, "petition")  # the first router sets its review timer, then stops before it fires
    other = await report(h, "road_damage")  # the router has handled the report's cue once this one is dispatched
    await h.wait_for(f"/v1/issues/{other}", h.auth("admin"), lambda b: len(b["tasks"]) >= 1)
    await first.close()
    await asyncio.sleep(3.5)  # both edges pass with no router running
    assert not any(t.startswith("review.") for t in types(await events(h, iid)))
    second: NeedleHandle = await needle_factory(ORG, RULES, nats_url=url, services=("router",))
    await h.wait_for(f"/v1/issues/{iid}", h.auth("admin"), lambda b: b["review"]["breached"], timeout=15)
    await asyncio.sleep(1.5)
    evs = types(await events(h, iid))
    assert evs.count("review.warned") == 1 and evs.count("review.breached") == 1
    assert second



# -- 合并办理 ------------------------------------------------------------------------------------------------
A, B, FAR = (30.0005, 122.1015), (30.0010, 122.1016), (30.0035, 122.1016)  # A-B ~57 m, B-FAR ~278 m


async def report_at(h: NeedleHandle, category: str, at: tuple[float, float], title: str = "路面塌陷") -> str:
    r = await h.client.post("/v1/issues", headers=h.auth(*G1),
                            json={"grid": "wuxing-g1", "category": category, "title": title,
                                  "location": {"lat": at[0], "lon": at[1]}})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def similar_ids(h: NeedleHandle, iid: str, who: tuple[str, str] = SUP) -> list[str]:
    r = await h.client.get(f"/v1/issues/{iid}/similar", headers=h.auth(*who))
    assert r.status_code == 200, r.text
    return [row["id"] for row in r.json()["items"]]


async def test_similar_issues_are_found_and_a_merged_duplicate_closes_with_its_target(h: NeedleHandle) -> None:
    target = await report_at(h, "road_damage", A)
    far = await report_at(h, "road_damage", FAR)
    other_kind = await report_at(h, "complaint", B, "投诉")
    dup = await report_at(h, "road_damage", B, "同一处塌陷")
    for _ in range(100):  # the read models catch up
        if target in await similar_ids(h, dup):
            break
        await asyncio.sleep(0.1)
    found = await similar_ids(h, dup)
    assert target in found and far not in found and other_kind not in found and dup not in found
    assert (await issue(h, dup))["similar"] >= 1
    g2 = h.auth("grid_worker", "area:wuxing-g2")  # who may not read the issue may not see its duplicates
    assert (await h.client.get(f"/v1/issues/{dup}/similar", headers=g2)).status_code == 403

    assert (await act(h, dup, "merge", G1, {"into": target})).status_code == 403  # not the grid worker's call
    assert (await act(h, dup, "merge", SUP, {"into": dup})).status_code == 422
    for into in ("01m97e6a7bapp6xvpvnsfmv000", "01NOSUCHISSUE"):  # well formed but unknown; malformed
        missing = await act(h, dup, "merge", SUP, {"into": into})
        assert missing.status_code == 422 and missing.json()["field"] == "into", missing.text
    for attempt in range(2):  # the retry records nothing
        r = await act(h, dup, "merge", SUP, {"into": target, "reason": "同一处"})
        assert r.status_code == 200, r.text
        assert (r.headers.get("Idempotent-Replayed") == "true") == (attempt == 1)
    merged = await issue(h, dup)
    assert merged["status"] == "merged" and merged["merged_into"] == target
    assert {t["status"] for t in merged["tasks"]} <= {"superseded"}
    assert types(await events(h, dup)).count("issue.merged") == 1
    assert (await act(h, far, "merge", SUP, {"into": dup})).status_code == 409  # a merged issue is no target
    assert (await act(h, dup, "merge", SUP, {"into": far})).status_code == 409  # merged already, elsewhere
    await h.wait_for(f"/v1/issues/{target}", h.auth("admin"), lambda b: b["duplicates"] == [dup])
    for _ in range(100):
        if target not in await similar_ids(h, far) and dup not in await similar_ids(h, target):
            break
        await asyncio.sleep(0.1)
    assert dup not in await similar_ids(h, target)  # merged: no longer an open candidate

    # the target is handled and verified: the duplicate closes with it, once, and its reporter's feedback counts
    body = await h.wait_for(f"/v1/issues/{target}", h.auth("admin"), lambda b: len(b["tasks"]) >= 1)
    lead = next(t for t in body["tasks"] if t["role"] == "lead")
    assert (await h.client.post(f"/v1/tasks/{lead['id']}/acknowledge", headers=h.auth(*ROADS))).status_code == 200
    r = await h.client.post(f"/v1/tasks/{lead['id']}/resolve", headers=h.auth(*ROADS), json={"note": "补好了"})
    assert r.status_code == 200, r.text
    r = await h.client.post(f"/v1/issues/{target}/verify", headers=h.auth(*G1), json={"passed": True})
    assert r.status_code == 200, r.text
    closed = await h.wait_for(f"/v1/issues/{dup}", h.auth("admin"), lambda b: b["status"] == "closed")
    assert closed["closed_at"] is not None
    r = await h.client.post(f"/v1/issues/{dup}/feedback", headers=h.auth(*G1), json={"satisfaction": "satisfied"})
    assert r.status_code == 200, r.text
    await asyncio.sleep(0.5)
    assert types(await events(h, dup)).count("issue.closed_with_target") == 1
    assert types(await events(h, target)).count("issue.duplicate_attached") == 1


async def test_a_duplicate_merged_into_an_issue_that_closed_meanwhile_closes_at_once(h: NeedleHandle) -> None:
    target = await report_at(h, "road_damage", A)
    dup = await report_at(h, "road_damage", B)
    r = await act(h, dup, "merge", SUP, {"into": target})
    assert r.status_code == 200, r.text
    await h.wait_for(f"/v1/issues/{target}", h.auth("admin"), lambda b: b["duplicates"] == [dup])
    assert (await act(h, target, "void", SUP, {"reason": "测试"})).status_code == 200
    await asyncio.sleep(1)  # a voided target closes nothing: the duplicate stays merged
    assert (await issue(h, dup))["status"] == "merged"


async def test_the_rates_leave_rejected_voided_and_merged_issues_out_and_stats_know_the_statuses(
        h: NeedleHandle) -> None:
    kept = [(await dispatched(h))["id"] for _ in range(2)]
    voided, rejected, merged = [(await dispatched(h))["id"] for _ in range(3)]
    held = await report(h, "complaint")
    assert (await act(h, voided, "void", SUP, {"reason": "测试"})).status_code == 200
    assert (await act(h, rejected, "reject", SUP, {"reason": "不属于政府职责"})).status_code == 200
    assert (await act(h, merged, "merge", SUP, {"into": kept[0]})).status_code == 200
    want_statuses = {"dispatched": 2, "voided": 1, "rejected": 1, "merged": 1, "pending_review": 1}
    body: dict[str, Any] = {}
    for _ in range(100):
        r = await h.client.get("/v1/stats", headers=h.auth(*SUP))
        assert r.status_code == 200, r.text
        body = r.json()
        if body["statuses"] == want_statuses and body["overall"]["counts"].get("merged"):
            break
        await asyncio.sleep(0.1)
    assert body["statuses"] == want_statuses, body["statuses"]
    counts = body["overall"]["counts"]
    assert counts["reported"] == 6 and counts["issues_dispatched"] == 2, body  # five were dispatched, two count
    assert (counts["voided"], counts["rejected"], counts["merged"]) == (1, 1, 1)
    assert body["overall"]["rates"]["resolution_rate"]["denominator"] == 0  # the two kept are not yet due
    assert held


async def test_a_merge_closes_its_duplicate_exactly_once_across_a_router_restart(needle_factory: Callable[..., Any]
                                                                                   ) -> None:
    h: NeedleHandle = await needle_factory(ORG, RULES, services=("intake",))
    target, dup = await report_at(h, "road_damage", A), await report_at(h, "road_damage", B)
    assert (await act(h, dup, "merge", SUP, {"into": target})).status_code == 200
    r = await h.client.post(f"/v1/issues/{target}/resolve-on-site", headers=h.auth(*G1), json={"note": "当场处理"})
    assert r.status_code == 200, r.text  # the target closes before any router has seen the merge
    url = h.stack.urls.nats
    first: NeedleHandle = await needle_factory(ORG, RULES, nats_url=url, services=("router",))
    await h.wait_for(f"/v1/issues/{dup}", h.auth("admin"), lambda b: b["status"] == "closed")
    await first.close()
    second: NeedleHandle = await needle_factory(ORG, RULES, nats_url=url, services=("router",))
    other = await report(h, "road_damage")  # the second router has caught up once this one is dispatched
    await h.wait_for(f"/v1/issues/{other}", h.auth("admin"), lambda b: len(b["tasks"]) >= 1)
    await asyncio.sleep(0.5)
    assert types(await events(h, dup)).count("issue.closed_with_target") == 1
    assert "task.dispatched" not in types(await events(h, dup)) + types(await events(h, target))
    assert second
