"""The four Zhoushan stories of DOMAIN.md, end to end on a real stack with the demo org and rulebook:
``needle demo``'s ``run_stories`` drives them over HTTP; here we check levels, escalation paths, lead
departments and every issue's events in order, plus the campaigns API's edges."""
from __future__ import annotations

import io
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from services.demo import DemoResult, Hop, run_stories
from services.demo.client import short_type
from services.demo.stories import infant_households
from shared.config import load_org
from shared.domain import ids
from tests.support import NeedleHandle

ROOT = Path(__file__).resolve().parents[2]
ORG = ROOT / "deploy" / "org" / "zhoushan.yaml"
RULES = ROOT / "deploy" / "rules" / "zhoushan.yaml"
DONE = ["task.acknowledged", "task.resolved"]
CLOSE = ["issue.verified", "issue.closed", "issue.feedback_recorded"]


async def _events(h: NeedleHandle, issue_id: str) -> list[dict[str, Any]]:
    r = await h.client.get(f"/v1/issues/{issue_id}/events", headers=h.auth("admin"))
    assert r.status_code == 200, r.text
    body: list[dict[str, Any]] = r.json()
    return body


def _types(events: list[dict[str, Any]]) -> list[str]:
    return [short_type(e["type"]) for e in events]


def _story(result: DemoResult, key: str) -> tuple[list[str], str | None]:
    s = next(s for s in result.stories if s.key == key)
    assert s.error is None, s.error
    return s.issue_ids, s.campaign


def _open_set(issue: dict[str, Any], level: str, role: str) -> set[str]:
    return {t["department"] for t in issue["tasks"] if t["level"] == level and t["role"] == role}


async def test_four_stories(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES)
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False, color_system=None)
    result = await run_stories(h.base_url, h.token, console, timeout=20)
    text = out.getvalue()
    assert result.all_closed, text
    assert "every issue closed" in text

    # ① slope works: the collective-petition risk lifts it to the street at once; the street command centre
    # leads with urban management, ecology and housing as co-handlers
    (slope,), _ = _story(result, "slope")
    issue = result.issues[slope]
    assert (issue["status"], issue["level"], issue["owner_area"], issue["satisfaction"]) == \
        ("closed", "street", "zhanmao", "satisfied")
    assert result.trails[slope] == [Hop("street", "zhanmao", "zhanmao-center", "risk")]
    co = {"zhanmao-enforcement", "zhanmao-ecology", "zhanmao-housing"}
    assert _open_set(issue, "street", "co") == co
    lead = next(t for t in issue["tasks"] if t["role"] == "lead")
    assert "座谈会7场" in lead["note"] and "爆破药量" in lead["note"]
    # photo evidence: the grid worker's before-photo with the report, the lead's after-photo with its resolve
    assert [(m["phase"], m["stage"]) for m in issue["media"]] == [("before", "report"), ("after", "resolve")]
    assert issue["media"][1]["task_id"] == lead["id"] and "POST /v1/media → 201" in text
    ev = await _events(h, slope)
    assert _types(ev) == ["issue.reported", "issue.routed", *["task.dispatched"] * 4,
                          *["task.acknowledged"] * 4, *["task.resolved"] * 4, *CLOSE]
    assert ev[0]["data"]["risk"] == ["collective_petition"]
    # it began on the 第33网格 team's visit: the report names the visit, the visit lists the report
    visit_id = ev[0]["data"]["visit"]
    r = await h.client.get(f"/v1/visits/{visit_id}", headers=h.auth("supervisor", "area:zhanmao"))
    assert r.status_code == 200, r.text
    assert (r.json()["grid"], r.json()["by"], r.json()["issues"]) == \
        ("zhanmao-g33", "handler:dept:zhanmao-g33-team", [slope])
    assert ev[2]["data"]["department"] == "zhanmao-center" and ev[2]["data"]["role"] == "lead"
    assert ev[6]["data"]["task_id"] == lead["id"]  # the lead acknowledges first
    assert ev[13]["data"]["task_id"] == lead["id"]  # ... and resolves last

    # ② sea safety: an emergency routed straight to the district ocean & fisheries bureau, natural-time clocks
    (sea,), _ = _story(result, "sea")
    issue = result.issues[sea]
    assert (issue["status"], issue["level"], issue["urgency"]) == ("closed", "district", "emergency")
    assert result.trails[sea] == [Hop("district", "putuo", "putuo-ocean", "reported")]
    assert _open_set(issue, "district", "co") == {"putuo-coastguard"}
    lead = next(t for t in issue["tasks"] if t["role"] == "lead")
    sent = datetime.fromisoformat(lead["dispatched_at"])
    assert lead["clock"] == "natural"
    assert datetime.fromisoformat(lead["acknowledge_due"]) - sent == timedelta(minutes=15)
    assert datetime.fromisoformat(lead["resolve_due"]) - sent == timedelta(hours=1)
    assert "6名" in lead["note"]
    assert _types(await _events(h, sea)) == ["issue.reported", "issue.routed", "task.dispatched", "task.dispatched",
                                             *["task.acknowledged"] * 2, *["task.resolved"] * 2, *CLOSE]

    # ③ care home: the community returns it (退单) -> street; the grid escalates (逐级反映) -> district, where
    # civil affairs leads health, housing and natural resources, supervised by the district command centre
    (care,), _ = _story(result, "care")
    issue = result.issues[care]
    assert (issue["status"], issue["level"], issue["escalations"]) == ("closed", "district", 2)
    assert result.trails[care] == [Hop("community", "huludao", "huludao-committee", "reported"),
                                   Hop("street", "xiazhi", "xiazhi-center", "escalated"),
                                   Hop("district", "putuo", "putuo-civil", "escalated")]
    assert _open_set(issue, "street", "co") == {"xiazhi-social-workers", "xiazhi-charity", "xiazhi-volunteers"}
    assert _open_set(issue, "district", "co") == {"putuo-health", "putuo-housing", "putuo-resources", "putuo-center"}
    ev = await _events(h, care)
    assert _types(ev) == [
        "issue.reported", "issue.routed", "task.dispatched",                  # community: the committee
        "task.returned",                                                       # 退单
        "issue.escalated", "issue.routed", *["task.dispatched"] * 4,           # street: centre + 3 co
        "task.acknowledged",                                                   # the street centre takes it
        "issue.escalated",                                                     # 逐级反映 by the grid worker
        "issue.routed", *["task.superseded"] * 4, *["task.dispatched"] * 5,    # district: civil + 4 co
        "issue.comment_added", "task.suspension_requested", "task.suspension_approved",  # 阶段性答复, 缓办
        "issue.comment_added", "task.resumed",                                 # progress again, clocks run
        *["task.acknowledged"] * 5, *["task.resolved"] * 5, *CLOSE]
    progress = [e["data"] for e in ev if short_type(e["type"]) == "issue.comment_added"]
    assert [(c["kind"], c["department"]) for c in progress] == [("progress", "putuo-civil")] * 2
    civil = next(t for t in issue["tasks"] if t["department"] == "putuo-civil")
    assert civil["suspensions"] == 1 and not civil["suspended"] and civil["suspended_for"] > 0
    escalations = [e["data"] for e in ev if short_type(e["type"]) == "issue.escalated"]
    assert [(e["from_level"], e["to_level"], e["cause"]) for e in escalations] == \
        [("community", "street", "return"), ("street", "district", "requested")]
    assert escalations[1]["by"] == "grid_worker:area:huludao-g1"
    assert {t["status"] for t in issue["tasks"] if t["level"] == "street"} == {"superseded"}
    assert next(t for t in issue["tasks"] if t["level"] == "community")["status"] == "returned"

    # ④ infant census: one issue per grid of 普陀区, each led by its community committee, all closed
    census, cid = _story(result, "census")
    assert cid is not None
    org = load_org(ORG)
    grids = [g.id for g in org.grids_under("putuo")]
    assert sorted(census) == sorted(ids.idempotent_issue_id(cid, g) for g in grids)
    sup = h.auth("supervisor", "area:putuo")
    r = await h.client.get(f"/v1/campaigns/{cid}", params={"area": "putuo"}, headers=sup)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["issues"], body["done"], body["percent"], body["status"]) == \
        (len(grids), len(grids), 100.0, {"closed": len(grids)})
    assert body["category"] == "infant_census" and body["levels"] == {"community": len(grids)}
    # every targeted household of the district visited, counted once per household, no grid lagging
    hh = body["households"]
    assert hh["target"] == hh["reached"] == sum(infant_households(g) for g in grids) and hh["lagging"] == []
    assert {g["grid"] for g in hh["grids"] if g["reached"] == g["target"]} == set(grids)
    cov = (await h.client.get("/v1/visits/coverage", params={"area": "putuo"}, headers=sup)).json()
    assert cov["total"]["visited"] == hh["reached"] + 1  # and the 第33网格 team's visit of the slope story
    for item in body["items"]:
        community = org.area(item["grid"]).parent
        assert item["lead"] == f"{community}-committee", item
        issue = result.issues[item["id"]]
        assert (issue["campaign"], issue["reporter"], issue["grid"]) == (cid, "supervisor:area:putuo", item["grid"])
        assert _types(await _events(h, item["id"])) == \
            ["issue.reported", "issue.routed", "task.dispatched", *DONE, "issue.verified", "issue.closed"]
    # a part of the area: only its grids
    r = await h.client.get(f"/v1/campaigns/{cid}", params={"area": "zhanmao"}, headers=sup)
    assert r.json()["issues"] == len(org.grids_under("zhanmao"))


async def test_campaign_api_edges(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES, services=("intake",))
    c: httpx.AsyncClient = h.client
    sup = h.auth("supervisor", "area:xiazhi")
    body = {"area": "xiazhi", "category": "infant_census", "title": "排查"}

    async def post(json: Any, headers: dict[str, str], key: str | None = None) -> httpx.Response:
        return await c.post("/v1/campaigns", json=json, headers=headers | ({"Idempotency-Key": key} if key else {}))

    r = await post(body, sup, "k1")
    assert r.status_code == 202, r.text
    first = r.json()
    assert (first["issues"], first["created"]) == (4, 4) and r.headers["Location"].startswith("/v1/campaigns/")
    r = await post(body, sup, "k1")  # a retry: same campaign, nothing new
    assert r.status_code == 202 and r.json()["id"] == first["id"] and r.json()["created"] == 0
    assert r.headers["Idempotent-Replayed"] == "true"
    assert (await post(body | {"title": "另一个"}, sup, "k1")).status_code == 409
    other = await post(body, h.auth("supervisor", "area:xiazhi", subject="another supervisor"), "k1")
    assert other.status_code == 202 and other.json()["id"] != first["id"]  # keys are per caller
    r = await post(body, sup)
    assert r.status_code == 202 and r.json()["id"] not in (first["id"], other.json()["id"])

    assert (await post(body | {"area": "putuo"}, sup)).status_code == 403  # above the supervisor's scope
    assert (await post(body, h.auth("grid_worker", "area:huludao-g1"))).status_code == 403
    assert (await post(body, {})).status_code == 401
    r = await post(body | {"area": "nowhere"}, sup)
    assert r.status_code == 422 and r.json()["field"] == "area"
    r = await post(body | {"category": "nothing"}, sup)
    assert r.status_code == 422 and r.json()["field"] == "category"
    assert (await post(body | {"extra": 1}, sup)).status_code == 422
    assert (await post(body, h.auth("admin"))).status_code == 202

    r = await c.get(f"/v1/campaigns/{first['id']}", params={"area": "xiazhi"}, headers=sup)
    assert r.status_code == 200
    status = r.json()
    assert (status["issues"], status["done"], status["percent"], status["status"]) == (4, 0, 0.0, {"reported": 4})
    assert (await c.get(f"/v1/campaigns/{first['id']}", params={"area": "dinghai"},
                        headers=h.auth("supervisor", "area:dinghai"))).status_code == 404
    assert (await c.get(f"/v1/campaigns/{first['id']}", params={"area": "putuo"}, headers=sup)).status_code == 403
    assert (await c.get("/v1/campaigns/c0000", params={"area": "xiazhi"}, headers=sup)).status_code == 404
    assert (await c.get("/v1/campaigns/Bad!", params={"area": "xiazhi"}, headers=sup)).status_code == 404
    assert (await c.get(f"/v1/campaigns/{first['id']}", headers=sup)).status_code == 422
