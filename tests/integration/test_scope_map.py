"""``GET /v1/map``: the grid map of an area in the caller's scope (the grid worker's page picks a report's place on
it). A grid worker gets its own grid's boundary and nothing around it; a supervisor the grids under its street;
another area is 403, an unknown one 422 naming ``area``, a handler 403."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import NeedleHandle

ROOT = Path(__file__).resolve().parents[2]


async def test_the_map_of_the_callers_scope(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(org=ROOT / "deploy" / "org" / "zhoushan.yaml",
                                           rules=ROOT / "deploy" / "rules" / "zhoushan.yaml")
    gw = h.auth("grid_worker", "area:zhanmao-g33")
    r = await h.client.get("/v1/map", headers=gw)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["area"]["id"] == "zhanmao-g33" and set(body["areas"]) == {"zhanmao-g33"}
    assert body["areas"]["zhanmao-g33"]["level"] == "grid"
    assert body["boundaries"]["zhanmao-g33"]["type"] in ("Polygon", "MultiPolygon")
    assert (await h.client.get("/v1/map?area=zhanmao", headers=gw)).status_code == 403  # the street is above it

    sup = (await h.client.get("/v1/map", headers=h.auth("supervisor", "area:zhanmao"))).json()
    grids = {a for a, v in sup["areas"].items() if v["level"] == "grid"}
    assert "zhanmao-g33" in grids and len(grids) >= 6 and grids <= set(sup["boundaries"])

    bad = await h.client.get("/v1/map?area=atlantis", headers=h.auth("admin"))
    assert bad.status_code == 422 and bad.json()["field"] == "area"
    assert (await h.client.get("/v1/map", headers=h.auth("handler", "dept:zhanmao-center"))).status_code == 403
