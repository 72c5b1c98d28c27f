"""Another city runs needle without editing Python: the invented 清河市 of tests/fixtures/anycity_*.yaml (kinds of
its own, a township whose grids sit directly under it) loads, routes a report to the district's sanitation unit,
and records the co-handler kind nothing serves in the event, the issue, the metric and the dashboard."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support import NeedleHandle, events, of_type

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ORG, RULES = FIXTURES / "anycity_org.yaml", FIXTURES / "anycity_rules.yaml"


async def test_a_township_report_goes_to_the_district_unit_and_the_gap_is_recorded(
        needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES)
    # given a grid worker of 柳庄镇 (a township without communities: its grids sit under it)
    worker = h.auth("grid_worker", "area:liuzhuang-g1")
    # when they report overflowing bins on a road the crowd blocks (risk flag blocked_road: urgent)
    r = await h.client.post("/v1/issues", headers=worker, json={
        "grid": "liuzhuang-g1", "category": "garbage_overflow", "title": "垃圾桶满溢", "risk": ["blocked_road"]})
    assert r.status_code == 201, r.text
    issue_id = r.json()["id"]
    admin = h.auth("admin")
    body = await h.wait_for(f"/v1/issues/{issue_id}", admin, lambda b: any(t["role"] == "lead" for t in b["tasks"]))

    # then the township owns it and the district's 环卫所 leads (the township has no sanitation unit of its own)
    assert (body["level"], body["owner_area"]) == ("street", "liuzhuang")
    assert [(t["department"], t["role"], t["kind"], t["kind_name"]) for t in body["tasks"]] == [
        ("dongcheng-sanitation", "lead", "sanitation", "环卫")]
    # the risk flag's urgency is the issue's urgency in force
    assert body["urgency"] == "urgent"
    # and landscaping, which nothing serves in 东城区, is recorded rather than dropped
    gap = {"kind": "landscaping", "area": "liuzhuang", "role": "co"}
    assert body["unserved"] == [gap]
    routed = of_type(await events(h, issue_id), "needle.issue.routed.v1")
    assert len(routed) == 1 and routed[0]["data"]["unserved"] == [gap]
    assert routed[0]["data"]["urgency"] == "urgent"
    assert "unserved co landscaping" in routed[0]["data"]["rule"]

    # the read models show the urgency in force too
    sup = h.auth("supervisor", "area:dongcheng")
    listed = await h.wait_for("/v1/issues?area=liuzhuang", sup,
                              lambda b: any(i["id"] == issue_id and i["level"] == "street" for i in b["items"]))
    assert next(i for i in listed["items"] if i["id"] == issue_id)["urgency"] == "urgent"

    # the gap is counted in a metric (from the read models)
    r = await h.client.get("/metrics")
    assert r.status_code == 200, r.text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    assert samples.get(("needle_routing_unserved_total", (("kind", "landscaping"), ("role", "co")))) == 1.0

    # and the dashboard lists the configuration gap under 东城区, with the kinds' display names
    r = await h.client.get("/dashboard/org?area=dongcheng", headers=sup)
    assert r.status_code == 200, r.text
    org = r.json()
    assert org["kinds"]["sanitation"] == "环卫" and org["kinds"]["disabled_persons_federation"] == "残联"
    garbage = [g for g in org["gaps"] if g["category"] == "garbage_overflow" and g["kind"] == "landscaping"]
    assert garbage == [{"category": "garbage_overflow", "level": "street", "kind": "landscaping",
                        "kind_name": "园林", "role": "co", "areas": ["liuzhuang", "hexi"]}]
    # gaps outside the watched area are not listed (山阳街道 is in 西城区)
    assert all("shanyang" not in g["areas"] for g in org["gaps"])
