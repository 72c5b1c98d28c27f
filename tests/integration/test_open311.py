"""Open311 GeoReport v2 conformance (http://wiki.open311.org/GeoReport_v2), on a real stack with the Zhoushan
demo org and rulebook: every endpoint in both formats (the XML parsed), the spec's error form and statuses,
and a request's round trip from a POST to ``closed`` as the needle lifecycle runs.

Written from the spec: a service list of ``service`` objects, definitions with typed ``attributes``, POST with
form-encoded parameters answered by ``service_request_id`` or ``token``, GET requests filtered by id, code,
dates and status, tokens mapped to ids, and errors as a list of ``{code, description}``."""
from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import NeedleHandle

ROOT = Path(__file__).resolve().parents[2]
ORG = ROOT / "deploy" / "org" / "zhoushan.yaml"
RULES = ROOT / "deploy" / "rules" / "zhoushan.yaml"
V2 = "/open311/v2"
NEAR_G33 = {"lat": "30.0351", "long": "122.2456"}  # a few metres from grid 第33网格 (展茅街道, 普陀区)
SERVICE_FIELDS = {"service_code", "service_name", "description", "metadata", "type", "keywords", "group"}
ATTRIBUTE_FIELDS = {"variable", "code", "datatype", "required", "datatype_description", "order", "description"}
DATATYPES = {"string", "number", "datetime", "text", "singlevaluelist", "multivaluelist"}
REQUEST_FIELDS = {"service_request_id", "status", "status_notes", "service_name", "service_code", "description",
                  "agency_responsible", "service_notice", "requested_datetime", "updated_datetime",
                  "expected_datetime", "address", "lat", "long", "media_url"}


@pytest.fixture
async def h(needle_factory: Callable[..., Any]) -> NeedleHandle:
    handle: NeedleHandle = await needle_factory(org=ORG, rules=RULES)
    return handle


def xml_of(r: httpx.Response, root: str) -> ET.Element:
    assert "xml" in r.headers["content-type"], r.headers["content-type"]
    doc = ET.fromstring(r.content)
    assert doc.tag == root, r.text
    return doc


def assert_error(r: httpx.Response, status: int | set[int], fmt: str = "json") -> str:
    """The spec's error form: a list of {code, description}, the HTTP status matching a code."""
    wanted = {status} if isinstance(status, int) else status
    assert r.status_code in wanted, (r.status_code, r.text)
    if fmt == "xml":
        errors = [(int(e.findtext("code") or 0), e.findtext("description") or "") for e in xml_of(r, "errors")]
    else:
        assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
        errors = [(e["code"], e["description"]) for e in r.json()]
    assert errors and errors[0][0] == r.status_code and errors[0][1], errors
    return errors[0][1]


def key_of(h: NeedleHandle, role: str = "reporter", scope: str = "") -> str:
    """A public app's key by default (integrators read only; docs/SECURITY.md, "Who files what")."""
    return h.token(role, scope)


async def submit(h: NeedleHandle, fmt: str = "json", /, **params: str | list[str]) -> httpx.Response:
    """POST form-encoded parameters (the spec's encoding; list values repeat the name)."""
    return await h.client.post(f"{V2}/requests.{fmt}", data=params)


async def submit_with(h: NeedleHandle, headers: dict[str, str], params: dict[str, str]) -> httpx.Response:
    return await h.client.post(f"{V2}/requests.json", data=params, headers=headers)


async def test_service_list_and_definitions(h: NeedleHandle) -> None:
    r = await h.client.get(f"{V2}/services.json")
    assert r.status_code == 200, r.text
    services = r.json()
    assert isinstance(services, list) and services
    for s in services:
        assert SERVICE_FIELDS <= set(s), s
        assert isinstance(s["metadata"], bool) and s["type"] in ("realtime", "batch", "blackbox")
    codes = [s["service_code"] for s in services]
    assert len(codes) == len(set(codes)) and "sea_safety" in codes
    sea = next(s for s in services if s["service_code"] == "sea_safety")
    assert (sea["service_name"], sea["group"]) == ("海上安全", "海洋渔业")

    doc = xml_of(await h.client.get(f"{V2}/services.xml"), "services")
    assert [e.findtext("service_code") for e in doc.findall("service")] == codes
    assert all(e.findtext("metadata") in ("true", "false") for e in doc.findall("service"))

    for s in (x for x in services if x["metadata"]):
        r = await h.client.get(f"{V2}/services/{s['service_code']}.json")
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["service_code"] == s["service_code"] and d["attributes"]
        for a in d["attributes"]:
            assert ATTRIBUTE_FIELDS <= set(a), a
            assert a["datatype"] in DATATYPES and isinstance(a["variable"], bool) and isinstance(a["required"], bool)
            assert isinstance(a["order"], int)
            if a["datatype"].endswith("valuelist"):
                assert a["values"] and all({"key", "name"} <= set(v) for v in a["values"])
    attrs = {a["code"]: a for a in d["attributes"]}
    assert [v["key"] for v in attrs["urgency"]["values"]] == ["normal", "urgent", "emergency"]
    assert attrs["urgency"]["datatype"] == "singlevaluelist" and attrs["risk"]["datatype"] == "multivaluelist"
    assert {v["key"] for v in attrs["risk"]["values"]} == {"collective_petition", "violence", "mass_casualty"}
    # the flags' display names are the rulebook's (risk.<flag>.name), not a list in code
    assert {"key": "collective_petition", "name": "集体上访苗头 (collective petition)"} in attrs["risk"]["values"]

    doc = xml_of(await h.client.get(f"{V2}/services/sea_safety.xml"), "service_definition")
    assert doc.findtext("service_code") == "sea_safety"
    xattrs = {a.findtext("code"): a for a in doc.findall("attributes/attribute")}
    assert xattrs["urgency"].findtext("datatype") == "singlevaluelist"
    assert [v.findtext("key") for v in xattrs["urgency"].findall("values/value")] == ["normal", "urgent", "emergency"]

    # unknown service: 404 (service definition), in both formats; an unknown jurisdiction too
    assert_error(await h.client.get(f"{V2}/services/no_such_service.json"), 404)
    assert_error(await h.client.get(f"{V2}/services/no_such_service.xml"), 404, "xml")
    assert_error(await h.client.get(f"{V2}/services.json", params={"jurisdiction_id": "elsewhere.gov"}), 404)
    r = await h.client.get(f"{V2}/services.json", params={"jurisdiction_id": "zhoushan"})
    assert r.status_code == 200 and len(r.json()) == len(services)


async def test_discovery_and_unknown_resources(h: NeedleHandle) -> None:
    r = await h.client.get(f"{V2}/discovery.json")
    assert r.status_code == 200, r.text
    ep = r.json()["endpoints"][0]
    assert ep["specification"] == "http://wiki.open311.org/GeoReport_v2" and ep["url"].endswith(f"{V2}/")
    doc = xml_of(await h.client.get(f"{V2}/discovery.xml"), "discovery")
    assert doc.findtext("endpoints/endpoint/specification") == "http://wiki.open311.org/GeoReport_v2"
    # nothing under /open311 answers in another error form than the spec's
    assert_error(await h.client.get(f"{V2}/nothing.json"), 404)
    assert_error(await h.client.get(f"{V2}/nothing/here.xml"), 404, "xml")
    assert_error(await h.client.get(f"{V2}/services.csv"), 404)
    assert_error(await h.client.delete(f"{V2}/requests.json"), 405)
    assert_error(await h.client.post(f"{V2}/services.json"), 405)


async def test_submit_errors(h: NeedleHandle) -> None:
    base = {"service_code": "sea_safety", "description": "渔船搁浅", **NEAR_G33}
    # api_key: missing or invalid -> 403
    assert_error(await submit(h, **base), 403)
    assert_error(await submit(h, "xml", **base), 403, "xml")
    assert_error(await submit(h, api_key="not-a-key", **base), 403)
    assert_error(await submit(h, api_key=key_of(h, "handler", "dept:putuo-ocean"), **base), 403)
    key = key_of(h)
    # service_code missing -> 400; unknown -> 400 or 404
    assert_error(await submit(h, api_key=key, description="x", **NEAR_G33), 400)
    assert_error(await submit(h, api_key=key, **{**base, "service_code": "no_such"}), {400, 404})
    assert_error(await submit(h, "xml", api_key=key, **{**base, "service_code": "no_such"}), {400, 404}, "xml")
    # location: missing, malformed, out of range, far outside the jurisdiction -> 400
    assert_error(await submit(h, api_key=key, service_code="sea_safety"), 400)
    for lat, lon in (("abc", "122.2"), ("91", "122.2"), ("30.0", "181"), ("30.0", ""), ("0", "0"), ("nan", "1")):
        assert_error(await submit(h, api_key=key, service_code="sea_safety", lat=lat, long=lon), 400)
    assert_error(await submit(h, api_key=key, service_code="sea_safety", address_string="火星基地"), 400)
    assert_error(await submit(h, api_key=key, service_code="sea_safety", address_string="网格"), 400)  # ambiguous
    # attributes: unknown value or unknown code -> 400
    assert_error(await submit(h, api_key=key, **base, **{"attribute[urgency]": "whenever"}), 400)
    assert_error(await submit(h, api_key=key, **base, **{"attribute[risk][]": ["violence", "aliens"]}), 400)
    assert_error(await submit(h, api_key=key, **base, **{"attribute[colour]": "red"}), 400)
    assert_error(await submit(h, api_key=key, **base, **{"attribute[grid]": "putuo"}), 400)  # not a grid
    # a grid worker's key only reports inside its grid
    assert_error(await submit(h, api_key=key_of(h, "grid_worker", "area:wuxing-g1"), **base), 403)
    # unknown request and token -> 404, both formats
    for path in ("requests/0000000000000000000000000", "tokens/0000000000000000000000000", "requests/bad!id"):
        assert_error(await h.client.get(f"{V2}/{path}.json"), 404)
        assert_error(await h.client.get(f"{V2}/{path}.xml"), 404, "xml")
    # search filters
    for params in ({"status": "pending"}, {"start_date": "yesterday"},
                   {"start_date": "2025-01-01T00:00:00Z", "end_date": "2025-06-01T00:00:00Z"}):
        assert_error(await h.client.get(f"{V2}/requests.json", params=params), 400)
    assert_error(await h.client.get(f"{V2}/requests.xml", params={"status": "pending"}), 400, "xml")


async def _lead_task(h: NeedleHandle, issue_id: str) -> str:
    issue = await h.wait_for(f"/v1/issues/{issue_id}", h.auth("admin"),
                             lambda b: any(t["role"] == "lead" for t in b["tasks"]))
    return str(next(t["id"] for t in issue["tasks"] if t["role"] == "lead"))


async def _poll(h: NeedleHandle, path: str, predicate: Callable[[Any], bool], params: Any = None,
                timeout: float = 15.0) -> Any:
    body: Any = None
    for _ in range(int(timeout / 0.1)):
        r = await h.client.get(path, params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        if predicate(body):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out on {path}: {body}")


async def test_round_trip_to_closed(h: NeedleHandle) -> None:
    started = datetime.now(UTC) - timedelta(minutes=1)
    # emergency: a staff key (a reporter's may say urgent at most)
    r = await submit(h, api_key=key_of(h, "admin"), service_code="sea_safety",
                     description="渔船在展茅外海搁浅\n船上三人",
                     email="resident@example.org", first_name="Mei", last_name="Wang", phone="13800000000",
                     **NEAR_G33, **{"attribute[urgency]": "emergency"})
    assert r.status_code in (200, 201), r.text
    (ack,) = r.json()
    rid = ack.get("service_request_id") or ack["token"]
    assert "service_notice" in ack and "account_id" in ack
    if ack.get("token"):  # a token maps to the request id
        r = await h.client.get(f"{V2}/tokens/{ack['token']}.json")
        assert r.status_code == 200 and r.json()[0]["service_request_id"] == rid, r.text
        doc = xml_of(await h.client.get(f"{V2}/tokens/{ack['token']}.xml"), "service_requests")
        assert doc.findtext("request/service_request_id") == rid

    # open at once; the responsible agency once the router has dispatched it. Full detail (the description,
    # the exact point) needs a key that covers the issue (the anonymous view: test_hardening.py)
    r = await h.client.get(f"{V2}/requests/{rid}.json", headers=h.auth("integrator"))
    assert r.status_code == 200, r.text
    (req,) = r.json()
    assert REQUEST_FIELDS <= set(req), req
    assert (req["service_request_id"], req["status"], req["service_code"]) == (rid, "open", "sea_safety")
    assert req["service_name"] == "海上安全" and "渔船在展茅外海搁浅" in req["description"]
    assert abs(float(req["lat"]) - 30.0351) < 1e-6 and abs(float(req["long"]) - 122.2456) < 1e-6
    assert datetime.fromisoformat(req["requested_datetime"]) >= started
    (req,) = await _poll(h, f"{V2}/requests/{rid}.json", lambda b: b[0]["agency_responsible"])
    assert req["agency_responsible"] == "普陀区海洋与渔业局" and req["status"] == "open"
    assert datetime.fromisoformat(req["expected_datetime"]) > datetime.fromisoformat(req["requested_datetime"])
    doc = xml_of(await h.client.get(f"{V2}/requests/{rid}.xml"), "service_requests")
    (xreq,) = doc.findall("request")
    assert xreq.findtext("service_request_id") == rid and xreq.findtext("status") == "open"
    assert xreq.findtext("agency_responsible") == "普陀区海洋与渔业局"

    # searchable: by id (from the event store) and by filters (read models)
    r = await h.client.get(f"{V2}/requests.json", params={"service_request_id": f"{rid},0000000000000000000000000"})
    assert [x["service_request_id"] for x in r.json()] == [rid]
    listed = await _poll(h, f"{V2}/requests.json", lambda b: any(x["service_request_id"] == rid for x in b),
                         {"service_code": "sea_safety", "status": "open"})
    row = next(x for x in listed if x["service_request_id"] == rid)
    assert REQUEST_FIELDS <= set(row) and row["status"] == "open" and row["service_code"] == "sea_safety"
    assert not any(x["service_code"] != "sea_safety" for x in listed)
    doc = xml_of(await h.client.get(f"{V2}/requests.xml", params={"status": "open"}), "service_requests")
    assert rid in [e.findtext("service_request_id") for e in doc.findall("request")]
    r = await h.client.get(f"{V2}/requests.json", params={"service_code": "noise"})
    assert rid not in [x["service_request_id"] for x in r.json()]
    old = {"start_date": "2020-01-01T00:00:00+08:00", "end_date": "2020-02-01T00:00:00+08:00"}
    assert (await h.client.get(f"{V2}/requests.json", params=old)).json() == []

    # nothing personal was published: the requester is the sealed resident, shown in clear only to those who
    # may see residents (here an admin), never in GeoReport reads or to integrators; the email is not kept
    published = (await h.client.get(f"/v1/issues/{rid}/events", headers=h.auth("integrator"))).json()
    for text in (str(published), str(req), str(row)):
        assert "resident@example.org" not in text and "13800000000" not in text and "Wang" not in text
    events = (await h.client.get(f"/v1/issues/{rid}/events", headers=h.auth("admin"))).json()
    assert events[0]["data"]["resident"]["name"] == "Mei Wang"
    assert events[0]["data"]["resident"]["phone"] == "+8613800000000"
    assert "resident@example.org" not in str(events)

    # the lifecycle closes it: the lead department acknowledges and resolves, the grid worker verifies
    task = await _lead_task(h, rid)
    handler = h.auth("handler", "dept:putuo-ocean")
    r = await h.client.post(f"/v1/tasks/{task}/acknowledge", headers=handler)
    assert r.status_code == 200, r.text
    r = await h.client.post(f"/v1/tasks/{task}/resolve", json={"note": "渔政船到场拖离"}, headers=handler)
    assert r.status_code == 200, r.text
    (req,) = (await h.client.get(f"{V2}/requests/{rid}.json", headers=h.auth("integrator"))).json()
    assert req["status"] == "open" and "渔政船到场拖离" in (req["status_notes"] or "")
    r = await h.client.post(f"/v1/issues/{rid}/verify", json={"passed": True},
                            headers=h.auth("grid_worker", "area:zhanmao-g33"))
    assert r.status_code == 200, r.text
    (req,) = (await h.client.get(f"{V2}/requests/{rid}.json")).json()
    assert req["status"] == "closed" and req["status_notes"]
    assert datetime.fromisoformat(req["updated_datetime"]) >= datetime.fromisoformat(req["requested_datetime"])
    await _poll(h, f"{V2}/requests.json", lambda b: rid in [x["service_request_id"] for x in b], {"status": "closed"})
    r = await h.client.get(f"{V2}/requests.json", params={"status": "open"})
    assert rid not in [x["service_request_id"] for x in r.json()]


async def test_submit_variants(h: NeedleHandle) -> None:
    key = key_of(h)
    # JSON body, an address instead of a point, a risk flag; answered in XML
    r = await h.client.post(f"{V2}/requests.xml", json={
        "api_key": key, "service_code": "construction_nuisance", "address_string": "展茅街道第33网格 张家宕",
        "description": "边坡爆破震动", "attribute": {"risk": ["collective_petition"], "urgency": "urgent"}})
    assert r.status_code in (200, 201), r.text
    doc = xml_of(r, "service_requests")
    rid = doc.findtext("request/service_request_id") or doc.findtext("request/token")
    assert rid
    issue = (await h.client.get(f"/v1/issues/{rid}", headers=h.auth("admin"))).json()
    assert (issue["grid"], issue["risk"], issue["urgency"]) == ("zhanmao-g33", ["collective_petition"], "urgent")
    assert "张家宕" in issue["description"]

    # an explicit grid; a grid worker's key inside its grid; the Idempotency-Key replays the same request
    gw = {"Idempotency-Key": "open311-variant-1"}
    params = {"api_key": key_of(h, "grid_worker", "area:wuxing-g1"), "service_code": "noise",
              "description": "广场舞噪声", "attribute[grid]": "wuxing-g1"}
    first = await submit_with(h, gw, params)
    again = await submit_with(h, gw, params)
    assert first.status_code in (200, 201) and again.status_code in (200, 201), (first.text, again.text)
    assert first.json()[0]["service_request_id"] == again.json()[0]["service_request_id"]
    other = await submit_with(h, gw, {**params, "description": "另一件事"})
    assert_error(other, 409)
    issue = (await h.client.get(f"/v1/issues/{first.json()[0]['service_request_id']}", headers=h.auth("admin"))).json()
    assert issue["grid"] == "wuxing-g1" and issue["reporter"] == "grid_worker:area:wuxing-g1"

    # a lat/long next to another grid maps to that grid (nearest grid of the org)
    r = await submit(h, api_key=key, service_code="road_damage", description="井盖缺失", lat="29.9441", long="122.2929")
    assert r.status_code in (200, 201), r.text
    issue = (await h.client.get(f"/v1/issues/{r.json()[0]['service_request_id']}", headers=h.auth("admin"))).json()
    assert issue["grid"] == "haibin-g1"
