"""The description in anonymous Open311 reads (issue 17, item 1; FixMyStreet's model): shown exactly when the
reporter marked it public and no moderator withdrew it, or a moderator approved it; notes and reasons never.
Over real HTTP, NATS and Postgres (the list is the read model's)."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import NeedleHandle, module_needle

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
V2 = "/open311/v2"
PROBLEM = "application/problem+json"
GW1 = ("grid_worker", "area:wuxing-g1")
ROADS = ("handler", "dept:dinghai-roads")
SUP_STREET = ("supervisor", "area:huannan")
ADMIN = ("admin", "")
TEXT = "环南路口路面塌陷约一米，已设警示"
ROAD = {"grid": "wuxing-g1", "category": "road_damage", "title": "环南路路面塌陷", "description": TEXT,
        "location": {"lat": 30.012345, "lon": 122.106789, "address": "环南路88号"}}
NOTE = "已联系王先生"


@pytest.fixture(scope="module")
async def h(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> AsyncIterator[NeedleHandle]:
    async with module_needle(tmp_path_factory.mktemp("publication"), pg_url, "publication") as handle:
        yield handle


async def reported(h: NeedleHandle, **extra: Any) -> str:
    """A road issue of grid 1 with a description, an exact point and address, dispatched and resolved with a
    note (what must never be public)."""
    r = await h.client.post("/v1/issues", json=ROAD | extra, headers=h.auth(*GW1))
    assert r.status_code == 201, r.text
    issue_id = str(r.json()["id"])
    issue = await h.wait_for(f"/v1/issues/{issue_id}", h.auth(*ADMIN), lambda b: len(b["tasks"]) >= 2)
    lead = next(t["id"] for t in issue["tasks"] if t["role"] == "lead")
    r = await h.client.post(f"/v1/tasks/{lead}/resolve", json={"note": NOTE}, headers=h.auth(*ROADS))
    assert r.status_code == 200, r.text
    return issue_id


async def anonymous_one(h: NeedleHandle, issue_id: str) -> dict[str, Any]:
    r = await h.client.get(f"{V2}/requests/{issue_id}.json")
    assert r.status_code == 200, r.text
    (req,) = r.json()
    assert NOTE not in str(req) and "环南路88号" not in str(req) and req["lat"] != 30.012345, req
    (by_id,) = (await h.client.get(f"{V2}/requests.json", params={"service_request_id": issue_id})).json()
    assert by_id["description"] == req["description"] and NOTE not in str(by_id), by_id  # (the router may move on)
    return dict(req)


async def anonymous_listed(h: NeedleHandle, issue_id: str, seq: str) -> dict[str, Any]:
    """The issue in the anonymous list (the read model), once it reflects stream sequence ``seq``."""
    r = await h.client.get(f"{V2}/requests.json", headers={"Needle-Min-Seq": seq})
    assert r.status_code == 200 and int(r.headers["Needle-Seq"]) >= int(seq), r.headers
    (row,) = [x for x in r.json() if x["service_request_id"] == issue_id]
    return dict(row)


async def publish(h: NeedleHandle, issue_id: str, public: bool, who: tuple[str, str] = SUP_STREET,
                  reason: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {"public": public} | ({"reason": reason} if reason else {})
    return await h.client.post(f"/v1/issues/{issue_id}/publication", json=body, headers=h.auth(*who))


async def events_of(h: NeedleHandle, issue_id: str) -> list[dict[str, Any]]:
    r = await h.client.get(f"/v1/issues/{issue_id}/events", headers=h.auth(*ADMIN))
    assert r.status_code == 200, r.text
    return list(r.json())


async def test_a_description_the_reporter_marked_public_is_shown_anonymously_and_an_unmarked_one_is_not(
        h: NeedleHandle) -> None:
    marked, plain = await reported(h, description_public=True), await reported(h)
    req = await anonymous_one(h, marked)
    assert req["description"] == TEXT and (req["lat"], req["long"]) == (30.012, 122.107), req  # still rounded
    assert req["status_notes"] == "resolved by 定海区交通运输局; awaiting verification by the grid worker", req
    assert (await anonymous_one(h, plain))["description"] is None
    issue = (await h.client.get(f"/v1/issues/{marked}", headers=h.auth(*GW1))).json()
    assert issue["description_public"] is True and issue["publication"] is None, issue
    assert (await h.client.get(f"/v1/issues/{plain}", headers=h.auth(*GW1))).json()["description_public"] is False
    reported_ev = (await events_of(h, marked))[0]
    assert reported_ev["data"]["description_public"] is True, reported_ev
    # the list (read model): the title, only for the marked one
    seq = str((await h.client.get(f"/v1/issues/{plain}", headers=h.auth(*ADMIN))).headers["Needle-Seq"])
    assert (await anonymous_listed(h, marked, seq))["description"] == ROAD["title"]
    assert (await anonymous_listed(h, plain, seq))["description"] is None


async def test_a_moderator_approves_then_withdraws_and_anonymous_reads_follow(h: NeedleHandle) -> None:
    issue_id = await reported(h)
    assert (await anonymous_one(h, issue_id))["description"] is None
    # a supervisor over the grid approves: one event, with the reason (never published)
    r = await publish(h, issue_id, True, reason="内容不含个人信息")
    assert r.status_code == 200, r.text
    assert "Idempotent-Replayed" not in r.headers
    body = r.json()
    assert body["description_public"] is True
    assert body["publication"] == {"public": True, "by": "supervisor:area:huannan", "reason": "内容不含个人信息"}, body
    (changed,) = [e for e in await events_of(h, issue_id)
                  if e["type"] == "needle.issue.description_publication_changed.v1"]
    assert changed["data"]["public"] is True and changed["sequence"] == int(r.headers["Needle-Seq"]), changed
    assert changed["actor"] == "supervisor:area:huannan", changed
    req = await anonymous_one(h, issue_id)
    assert req["description"] == TEXT and "内容不含个人信息" not in str(req), req
    assert (await anonymous_listed(h, issue_id, r.headers["Needle-Seq"]))["description"] == ROAD["title"]
    # the same decision again records nothing
    count = len(await events_of(h, issue_id))
    again = await publish(h, issue_id, True, who=ADMIN)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true", again.text
    assert len(await events_of(h, issue_id)) == count
    # an admin withdraws it: hidden again, in the single view and in the list
    r = await publish(h, issue_id, False, who=ADMIN, reason="含门牌号")
    assert r.status_code == 200 and r.json()["description_public"] is False, r.text
    req = await anonymous_one(h, issue_id)
    assert req["description"] is None and "含门牌号" not in str(req), req
    assert (await anonymous_listed(h, issue_id, r.headers["Needle-Seq"]))["description"] is None
    # a key covering the issue still reads everything
    (full,) = (await h.client.get(f"{V2}/requests/{issue_id}.json", headers=h.auth(*GW1))).json()
    assert full["description"] == TEXT and NOTE in full["status_notes"], full


async def test_a_moderator_withdraws_what_the_reporter_marked_public(h: NeedleHandle) -> None:
    issue_id = await reported(h, description_public=True)
    assert (await anonymous_one(h, issue_id))["description"] == TEXT
    r = await publish(h, issue_id, False, reason="含住址")
    assert r.status_code == 200 and "Idempotent-Replayed" not in r.headers, r.text
    assert (await anonymous_one(h, issue_id))["description"] is None


@pytest.mark.parametrize("who", [GW1, ROADS, ("handler", "dept:huannan-center"), ("supervisor", "area:wuxing-g2"),
                                 ("integrator", ""), ("reporter", "")])
async def test_grid_workers_handlers_and_others_may_not_moderate(h: NeedleHandle, who: tuple[str, str]) -> None:
    issue_id = await reported(h)
    count = len(await events_of(h, issue_id))
    r = await publish(h, issue_id, True, who=who)
    assert r.status_code == 403 and r.headers["content-type"].startswith(PROBLEM), r.text
    assert len(await events_of(h, issue_id)) == count
    assert (await anonymous_one(h, issue_id))["description"] is None


async def test_bad_moderation_requests_are_404_or_422_naming_the_field(h: NeedleHandle) -> None:
    sup = h.auth(*SUP_STREET)
    r = await h.client.post("/v1/issues/0123456789abcdefghjkmnpqrs/publication", json={"public": True}, headers=sup)
    assert r.status_code == 404 and r.headers["content-type"].startswith(PROBLEM), r.text
    r = await h.client.post("/v1/issues/*/publication", json={"public": True}, headers=sup)
    assert r.status_code == 422 and r.json().get("field") == "issue_id", r.text
    issue_id = await reported(h)
    for body, field in (({}, "public"), ({"public": "maybe"}, "public"), ({"public": True, "reason": "a\x00b"},
                                                                          "reason"),
                        ({"public": True, "extra": 1}, "extra")):
        r = await h.client.post(f"/v1/issues/{issue_id}/publication", json=body, headers=sup)
        assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM), r.text
        problem = r.json()
        assert field in str({problem.get("field")} | {e.get("field") for e in problem.get("errors", [])}), problem


async def test_open311_reporters_mark_the_description_public_and_an_appended_address_stays_private(
        h: NeedleHandle) -> None:
    key = h.token("reporter", "")
    r = await h.client.post(f"{V2}/requests.json", data={
        "api_key": key, "service_code": "road_damage", "description": "路灯不亮", "description_public": "true",
        "address_string": "五星社区第1网格 五星路12号"})
    assert r.status_code == 201, r.text
    issue_id = r.json()[0]["service_request_id"]
    req = await anonymous_one(h, issue_id)
    assert req["description"] == "路灯不亮" and "五星路12号" not in str(req), req
    (full,) = (await h.client.get(f"{V2}/requests/{issue_id}.json", headers=h.auth(*ADMIN))).json()
    assert "五星路12号" in full["description"], full  # the handler still reads the address
    # a JSON body's boolean; without the parameter: not public
    r = await h.client.post(f"{V2}/requests.json", json={
        "api_key": key, "service_code": "road_damage", "description": "井盖缺失", "description_public": True,
        "attribute": {"grid": "wuxing-g1"}})
    assert r.status_code == 201, r.text
    assert (await anonymous_one(h, r.json()[0]["service_request_id"]))["description"] == "井盖缺失"
    r = await h.client.post(f"{V2}/requests.json", data={
        "api_key": key, "service_code": "road_damage", "description": "井盖缺失", "attribute[grid]": "wuxing-g1"})
    assert r.status_code == 201, r.text
    assert (await anonymous_one(h, r.json()[0]["service_request_id"]))["description"] is None
    # anything but a boolean is a 400 in the spec's form
    r = await h.client.post(f"{V2}/requests.json", data={
        "api_key": key, "service_code": "road_damage", "description_public": "maybe", "attribute[grid]": "wuxing-g1"})
    assert r.status_code == 400 and "description_public" in r.json()[0]["description"], r.text


async def test_an_idempotency_key_replays_without_the_mark_and_refuses_another_mark(h: NeedleHandle) -> None:
    headers = h.auth(*GW1) | {"Idempotency-Key": f"pub-{uuid.uuid4().hex}"}
    body = {"grid": "wuxing-g1", "category": "road_damage", "title": "replay"}
    first = await h.client.post("/v1/issues", json=body, headers=headers)
    assert first.status_code == 201, first.text
    again = await h.client.post("/v1/issues", json=body | {"description_public": False}, headers=headers)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true", again.text
    other = await h.client.post("/v1/issues", json=body | {"description_public": True}, headers=headers)
    assert other.status_code == 409, other.text
