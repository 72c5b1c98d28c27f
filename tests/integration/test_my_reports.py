"""我的上报: ``GET /v1/issues?reporter=me`` lists only the caller's own reports (the read model carries the
reporting token's subject); two grid workers of one grid each see theirs, the grid's list holds both, and a
supervisor may name a reporter."""
from __future__ import annotations

from tests.support import NeedleHandle

GRID = "wuxing-g1"


async def test_reporter_me_lists_only_the_callers_reports(needle: NeedleHandle) -> None:
    h = needle
    mine, theirs = h.auth("grid_worker", f"area:{GRID}", "gw-li"), h.auth("grid_worker", f"area:{GRID}", "gw-wang")
    ids = {}
    for who, headers in (("li", mine), ("wang", theirs)):
        r = await h.client.post("/v1/issues", headers=headers,
                                json={"grid": GRID, "category": "road_damage", "title": f"pothole by {who}"})
        assert r.status_code == 201, r.text
        ids[who] = r.json()["id"]
    every = await h.wait_for(f"/v1/issues?area={GRID}", mine, lambda b: len(b["items"]) >= 2)
    assert {i["id"] for i in every["items"]} >= set(ids.values())
    for who, headers in (("li", mine), ("wang", theirs)):
        own = (await h.client.get(f"/v1/issues?area={GRID}&reporter=me", headers=headers)).json()
        assert [i["id"] for i in own["items"]] == [ids[who]]
    sup = h.auth("supervisor", "area:huannan")
    named = (await h.client.get("/v1/issues?reporter=gw-wang", headers=sup)).json()
    assert [i["id"] for i in named["items"]] == [ids["wang"]]
    assert (await h.client.get("/v1/issues?reporter=nobody", headers=sup)).json()["items"] == []
