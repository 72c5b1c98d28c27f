"""The HTTP contract of DESIGN.md ("Contract: HTTP API") against a real stack over real HTTP:
reports and their idempotency, validation (never a 5xx), authentication and scopes, If-Match,
the task lifecycle, and the read-model queries with read-your-writes.

Tests that only need the event store share one module-wide stack (``h``); tests that need the
read models, another org or other settings start their own through ``needle_factory``."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest

from shared import auth
from tests.support import NeedleHandle, module_needle

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
DEMO_ORG = ROOT / "deploy" / "org" / "zhoushan.yaml"
DEMO_RULES = ROOT / "deploy" / "rules" / "zhoushan.yaml"

GW1 = ("grid_worker", "area:wuxing-g1")
GW2 = ("grid_worker", "area:wuxing-g2")
ROADS = ("handler", "dept:dinghai-roads")
POLICE = ("handler", "dept:dinghai-police")
COMMITTEE = ("handler", "dept:wuxing-committee")
SUP_DINGHAI = ("supervisor", "area:dinghai")
SUP_WUXING = ("supervisor", "area:wuxing")
INTEGRATOR = ("integrator", "")
ADMIN = ("admin", "")
PROBLEM = "application/problem+json"

Factory = Callable[..., Any]


# -- helpers ------------------------------------------------------------------------------------------------------
def road(**extra: Any) -> dict[str, Any]:
    return {"grid": "wuxing-g1", "category": "road_damage", "title": "pothole on Huannan Road"} | extra


def dispute(**extra: Any) -> dict[str, Any]:
    return {"grid": "wuxing-g2", "category": "neighbour_dispute", "title": "noisy neighbours"} | extra


def problem(r: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    """``r`` is an RFC 9457 problem with ``status``, naming ``field`` when given."""
    assert r.status_code == status, f"{r.status_code} {r.text}"
    assert r.headers["content-type"].startswith(PROBLEM), r.headers["content-type"]
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body.get("title") and body.get("detail")
    if field is not None:
        named = {body.get("field")} | {e.get("field") for e in body.get("errors", [])}
        assert field in named, body
    return body


async def report(h: NeedleHandle, body: dict[str, Any] | None = None, who: tuple[str, str] = GW1, *,
                 key: str | None = None, subject: str | None = None) -> httpx.Response:
    headers = h.auth(*who, subject=subject) | ({"Idempotency-Key": key} if key else {})
    return await h.client.post("/v1/issues", json=road() if body is None else body, headers=headers)


async def report_ok(h: NeedleHandle, body: dict[str, Any] | None = None, who: tuple[str, str] = GW1, *,
                    key: str | None = None) -> tuple[str, httpx.Response]:
    r = await report(h, body, who, key=key)
    assert r.status_code == 201, r.text
    return str(r.json()["id"]), r


async def dispatched(h: NeedleHandle, issue_id: str) -> tuple[dict[str, Any], int]:
    """Waits for the router's dispatch; the issue and the stream sequence that reflects it."""
    body = await h.wait_for(f"/v1/issues/{issue_id}", h.auth(*ADMIN), lambda b: len(b["tasks"]) > 0)
    r = await h.client.get(f"/v1/issues/{issue_id}", headers=h.auth(*ADMIN))
    return body, int(r.headers["Needle-Seq"])


async def events_of(h: NeedleHandle, issue_id: str) -> list[dict[str, Any]]:
    r = await h.client.get(f"/v1/issues/{issue_id}/events", headers=h.auth(*ADMIN))
    assert r.status_code == 200, r.text
    out: list[dict[str, Any]] = r.json()
    return out


def short(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("needle.").removesuffix(".v1") for e in events]


# -- one stack for the tests that need no read models -------------------------------------------------------------
@pytest.fixture(scope="module")
async def h(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> AsyncIterator[NeedleHandle]:
    async with module_needle(tmp_path_factory.mktemp("intake-api"), pg_url, "intake") as handle:
        yield handle


@pytest.fixture(scope="module")
async def road_issue(h: NeedleHandle) -> dict[str, Any]:
    """A road-damage issue in wuxing-g1, dispatched to dinghai-roads (lead) and dinghai-police (co)."""
    issue_id, _ = await report_ok(h, road(title="shared road issue"))
    body, _ = await dispatched(h, issue_id)
    return body


# -- reporting ----------------------------------------------------------------------------------------------------
async def test_report_returns_201_with_location_etag_and_needle_seq(h: NeedleHandle) -> None:
    r = await report(h, road(description="the kerb is broken", urgency="urgent", risk=[],
                             location={"lat": 30.0020, "lon": 122.1028, "address": "环南路 1 号"}))
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) >= {"id", "status", "version"}
    assert body["status"] == "reported" and body["version"] == 1
    assert r.headers["Location"] == f"/v1/issues/{body['id']}"
    assert r.headers["ETag"] == '"1"'
    assert int(r.headers["Needle-Seq"]) > 0


async def test_a_plain_report_takes_the_fast_path_and_answers_as_the_route_does(
        h: NeedleHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """services/intake/fastpath.py answers a plain report without the framework; the FastAPI route answers
    the rest (here: a ``+json`` media type, which the route accepts and the fast path leaves to it). Both
    answers carry the same status, headers and body shape; errors are still worded by the route."""
    from services.intake import fastpath

    taken: list[str] = []
    real = fastpath.record_report

    async def counting(*args: Any, **kwargs: Any) -> Any:
        out = await real(*args, **kwargs)
        taken.append(out.issue_id)
        return out

    monkeypatch.setattr(fastpath, "record_report", counting)
    fast = await report(h, road(title="fast"), key=f"fp-{uuid.uuid4()}")
    assert fast.status_code == 201, fast.text
    assert taken == [fast.json()["id"]]
    routed = await h.client.post("/v1/issues", content=orjson.dumps(road(title="routed")),
                                 headers=h.auth(*GW1) | {"Content-Type": "application/vnd.needle+json"})
    assert routed.status_code == 201, routed.text
    assert taken == [fast.json()["id"]]  # the route recorded it, not the fast path
    skip = {"date", "content-length", "location", "needle-seq", "x-request-id", "traceparent"}
    assert {k for k in fast.headers if k not in skip} == {k for k in routed.headers if k not in skip}
    for name in ("content-type", "etag", "cache-control", "x-content-type-options", "content-security-policy"):
        assert fast.headers[name] == routed.headers[name], name
    assert fast.headers["x-request-id"] and fast.headers["Location"] == f"/v1/issues/{fast.json()['id']}"
    assert set(fast.json()) == set(routed.json()) and fast.json()["status"] == routed.json()["status"]
    # a replay through the fast path says so, as the route does
    replay = await report(h, road(title="fast"), key=fast.request.headers["Idempotency-Key"])
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == fast.json()["id"]
    # refused input never reaches the fast path's recording: the route words the problem
    problem(await report(h, road(colour="red")), 422, "colour")
    problem(await report(h, road(grid="wuxing-g2")), 403)
    assert len(taken) == 2


async def test_get_reflects_the_write_immediately(h: NeedleHandle) -> None:
    issue_id, r = await report_ok(h, road(title="read me back", description="right away"))
    g = await h.client.get(r.headers["Location"], headers=h.auth(*GW1))  # no waiting, no Needle-Min-Seq
    assert g.status_code == 200, g.text
    issue = g.json()
    assert issue["id"] == issue_id and issue["title"] == "read me back" and issue["description"] == "right away"
    assert issue["grid"] == "wuxing-g1" and issue["category"] == "road_damage" and issue["urgency"] == "normal"
    assert issue["status"] in ("reported", "dispatched") and issue["version"] >= 1
    assert int(g.headers["Needle-Seq"]) >= int(r.headers["Needle-Seq"])
    assert g.headers["ETag"] == f'"{issue["version"]}"'
    assert {"id", "grid", "category", "status", "level", "owner_area", "urgency", "version", "tasks"} <= set(issue)


async def test_events_are_cloudevents_oldest_first(h: NeedleHandle, road_issue: dict[str, Any]) -> None:
    issue_id = road_issue["id"]
    for who in (ADMIN, INTEGRATOR, GW1):
        r = await h.client.get(f"/v1/issues/{issue_id}/events", headers=h.auth(*who))
        assert r.status_code == 200, r.text
    events = r.json()
    assert short(events)[:4] == ["issue.reported", "issue.routed", "task.dispatched", "task.dispatched"]
    for n, e in enumerate(events, 1):
        assert e["specversion"] == "1.0"
        assert {"id", "source", "type", "subject", "time", "data"} <= set(e)
        assert e["id"] == f"{issue_id}.{n}" and e["subject"] == issue_id
        assert e["type"].startswith("needle.") and e["type"].endswith(".v1")
    seqs = [e["sequence"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    times = [e["time"] for e in events]
    assert times == sorted(times)
    assert events[0]["source"] == "needle/intake" and events[1]["source"] == "needle/router"
    assert events[0]["data"]["title"] == "shared road issue"
    assert {e["data"]["department"] for e in events[2:4]} == {"dinghai-roads", "dinghai-police"}


async def test_same_idempotency_key_replayed_returns_the_same_issue(h: NeedleHandle) -> None:
    key = f"form-{uuid.uuid4()}"
    first_id, first = await report_ok(h, road(title="replayed"), key=key)
    again = await report(h, road(title="replayed"), key=key)
    assert again.status_code in (200, 201), again.text
    assert again.json()["id"] == first_id
    assert again.headers["Location"] == first.headers["Location"]

    # a burst of concurrent replays (a flaky network) still makes one issue
    burst = await asyncio.gather(*(report(h, road(title="replayed"), key=key) for _ in range(6)))
    assert {r.status_code for r in burst} <= {200, 201}, [r.text for r in burst]
    assert {r.json()["id"] for r in burst} == {first_id}
    assert short(await events_of(h, first_id)).count("issue.reported") == 1

    # keys belong to their reporter: another grid worker's identical key is another issue
    other = await report(h, road(title="replayed"), key=key, subject="gw-other")
    assert other.status_code == 201 and other.json()["id"] != first_id


async def test_only_a_keyed_report_records_what_a_replay_must_match(h: NeedleHandle) -> None:
    keyed, _ = await report_ok(h, road(title="with a key"), key=f"form-{uuid.uuid4()}")
    plain, _ = await report_ok(h, road(title="without"))
    digest = (await events_of(h, keyed))[0]["data"]["request_hash"]
    assert isinstance(digest, str) and len(digest) == 64
    assert (await events_of(h, plain))[0]["data"]["request_hash"] is None  # no key, nothing ever compares it


async def test_concurrent_first_use_of_a_key_makes_one_issue(h: NeedleHandle) -> None:
    key = f"form-{uuid.uuid4()}"
    rs = await asyncio.gather(*(report(h, road(title="raced"), key=key) for _ in range(6)))
    assert {r.status_code for r in rs} <= {200, 201}, [r.text for r in rs]
    ids = {r.json()["id"] for r in rs}
    assert len(ids) == 1
    assert short(await events_of(h, ids.pop())).count("issue.reported") == 1


async def test_same_idempotency_key_with_another_body_is_409(h: NeedleHandle) -> None:
    key = f"form-{uuid.uuid4()}"
    issue_id, _ = await report_ok(h, road(title="original"), key=key)
    r = await report(h, road(title="something else"), key=key)
    problem(r, 409, "Idempotency-Key")
    assert short(await events_of(h, issue_id)).count("issue.reported") == 1
    g = await h.client.get(f"/v1/issues/{issue_id}", headers=h.auth(*GW1))
    assert g.json()["title"] == "original"


async def test_replay_after_the_duplicate_window_still_returns_the_same_issue(needle_factory: Factory) -> None:
    hh: NeedleHandle = await needle_factory(duplicate_window_s=1, services=("intake", "router"))
    key = f"form-{uuid.uuid4()}"
    issue_id, _ = await report_ok(hh, road(title="late replay"), key=key)
    await asyncio.sleep(2.5)  # JetStream's duplicate window (1 s) has passed: only the stream itself remembers
    again = await report(hh, road(title="late replay"), key=key)
    assert again.status_code in (200, 201), again.text
    assert again.json()["id"] == issue_id
    assert short(await events_of(hh, issue_id)).count("issue.reported") == 1
    problem(await report(hh, road(title="late, different"), key=key), 409, "Idempotency-Key")


# -- validation: always a 4xx problem naming the field, never a 5xx -----------------------------------------------
def _json(raw: str) -> dict[str, Any]:
    return {"content": raw.encode(), "headers": {"Content-Type": "application/json"}}


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 8192):
        yield data[i:i + 8192]


INVALID: list[tuple[str, Callable[[], dict[str, Any]], int, str | None]] = [
    ("bad-json", lambda: _json('{"grid": "wuxing-g1", "category": '), 400, None),
    ("json-trailing-garbage", lambda: _json('{"grid": "wuxing-g1"} xyz'), 400, None),
    ("json-array", lambda: _json("[1, 2]"), 422, None),
    ("json-null", lambda: _json("null"), 422, None),
    ("deeply-nested", lambda: _json("[" * 20000 + "]" * 20000), 400, None),
    ("missing-title", lambda: {"json": {"grid": "wuxing-g1", "category": "road_damage"}}, 422, "title"),
    ("empty-title", lambda: {"json": road(title="   ")}, 422, "title"),
    ("title-wrong-type", lambda: {"json": road(title=5)}, 422, "title"),
    ("unknown-field", lambda: {"json": road(colour="red")}, 422, "colour"),
    ("unknown-location-field", lambda: {"json": road(location={"lat": 30, "lon": 122, "alt": 3})}, 422,
     "location.alt"),
    ("oversized-body", lambda: {"json": road(description="x" * (70 * 1024))}, 413, None),
    ("oversized-chunked-body", lambda: {"content": _chunks(b'{"title": "' + b"x" * (80 * 1024) + b'"}'),
                                        "headers": {"Content-Type": "application/json"}}, 413, None),
    ("title-too-long", lambda: {"json": road(title="x" * 201)}, 422, "title"),
    ("description-too-long", lambda: {"json": road(description="x" * 5001)}, 422, "description"),
    ("address-too-long", lambda: {"json": road(location={"lat": 30, "lon": 122, "address": "x" * 501})}, 422,
     "location.address"),
    ("lat-91", lambda: {"json": road(location={"lat": 91, "lon": 122})}, 422, "location.lat"),
    ("lon-181", lambda: {"json": road(location={"lat": 30, "lon": 181})}, 422, "location.lon"),
    ("lat-nan", lambda: _json('{"grid": "wuxing-g1", "category": "road_damage", "title": "t", '
                              '"location": {"lat": NaN, "lon": 122}}'), 422, "location.lat"),
    ("lon-infinity", lambda: _json('{"grid": "wuxing-g1", "category": "road_damage", "title": "t", '
                                   '"location": {"lat": 30, "lon": Infinity}}'), 422, "location.lon"),
    ("unknown-grid", lambda: {"json": road(grid="wuxing-g9")}, 422, "grid"),
    ("community-as-grid", lambda: {"json": road(grid="wuxing")}, 422, "grid"),
    ("district-as-grid", lambda: {"json": road(grid="dinghai")}, 422, "grid"),
    ("grid-with-dots", lambda: {"json": road(grid="wuxing.g1")}, 422, "grid"),
    ("unknown-category", lambda: {"json": road(category="alien_landing")}, 422, "category"),
    ("unknown-risk-flag", lambda: {"json": road(risk=["violence", "arson"])}, 422, "risk.1"),
    ("risk-not-a-list", lambda: {"json": road(risk="violence")}, 422, "risk"),
    ("unknown-urgency", lambda: {"json": road(urgency="whenever")}, 422, "urgency"),
    ("idempotency-key-too-long", lambda: {"json": road(), "headers": {"Idempotency-Key": "k" * 201}}, 422,
     "Idempotency-Key"),
]


@pytest.mark.parametrize(("request_kw", "status", "field"), [
    pytest.param(kw, s, f, id=i) for i, kw, s, f in INVALID])
async def test_invalid_report_is_a_4xx_problem_naming_the_field(
        h: NeedleHandle, request_kw: Callable[[], dict[str, Any]], status: int, field: str | None) -> None:
    kw = request_kw()
    headers = h.auth(*GW1) | kw.pop("headers", {})
    r = await h.client.post("/v1/issues", headers=headers, **kw)
    assert r.status_code < 500, r.text
    problem(r, status, field)


# -- authentication and scopes ------------------------------------------------------------------------------------
def _bad_auth(h: NeedleHandle, case: str) -> dict[str, str]:
    key = auth.load_or_create_key(h.stack.settings.data_dir)
    now = time.time()
    tokens = {
        "malformed": "not-a-jwt",
        "wrong-signature": auth.issue_token(b"f" * 64, role="grid_worker", scope="area:wuxing-g1"),
        "expired": auth.issue_token(key, role="grid_worker", scope="area:wuxing-g1", ttl_s=60, now=now - 3600),
        "unknown-role": jwt.encode({"iss": "needle", "sub": "x", "role": "mayor", "scope": "", "iat": int(now),
                                    "exp": int(now) + 600, "jti": "j1"}, key, algorithm="HS256"),
        "no-expiry": jwt.encode({"iss": "needle", "sub": "x", "role": "admin", "scope": "", "iat": int(now),
                                 "jti": "j2"}, key, algorithm="HS256"),
        "alg-none": jwt.encode({"iss": "needle", "sub": "x", "role": "admin", "scope": "", "iat": int(now),
                                "exp": int(now) + 600, "jti": "j3"}, None, algorithm="none"),
    }
    if case == "no-token":
        return {}
    if case == "empty-bearer":
        return {"Authorization": "Bearer"}
    if case == "basic-scheme":
        return {"Authorization": "Basic Z3c6cGFzcw=="}
    return {"Authorization": f"Bearer {tokens[case]}"}


@pytest.mark.parametrize("case", ["no-token", "empty-bearer", "basic-scheme", "malformed", "wrong-signature",
                                  "expired", "unknown-role", "no-expiry", "alg-none"])
@pytest.mark.parametrize("route", ["report", "read", "list", "acknowledge"])
async def test_without_a_valid_token_is_401(h: NeedleHandle, road_issue: dict[str, Any], case: str,
                                            route: str) -> None:
    headers = _bad_auth(h, case)
    issue_id = road_issue["id"]
    if route == "report":
        r = await h.client.post("/v1/issues", json=road(), headers=headers)
    elif route == "read":
        r = await h.client.get(f"/v1/issues/{issue_id}", headers=headers)
    elif route == "list":
        r = await h.client.get("/v1/issues", headers=headers)
    else:
        r = await h.client.post(f"/v1/tasks/{issue_id}-1/acknowledge", headers=headers)
    problem(r, 401)
    assert r.headers.get("WWW-Authenticate", "").lower().startswith("bearer")


@pytest.mark.parametrize("who", [GW2, ROADS, INTEGRATOR, SUP_DINGHAI, ("grid_worker", "area:nowhere")],
                         ids=["grid-worker-of-g2", "handler", "integrator", "supervisor", "unknown-area"])
async def test_reporting_outside_role_or_grid_is_403(h: NeedleHandle, who: tuple[str, str]) -> None:
    r = await report(h, road(title="not mine to report"), who)
    problem(r, 403)


@pytest.mark.parametrize(("who", "status"), [
    (GW1, 200), (GW2, 403), (ROADS, 200), (POLICE, 200), (COMMITTEE, 403), (SUP_DINGHAI, 200),
    (SUP_WUXING, 200), (("supervisor", "area:huannan"), 200), (("supervisor", "area:wuxing-g2"), 403),
    (("supervisor", "area:nowhere"), 403), (INTEGRATOR, 200), (ADMIN, 200),
], ids=["own-grid-worker", "other-grid-worker", "lead-handler", "co-handler", "handler-without-task",
        "district-supervisor", "community-supervisor", "street-supervisor", "other-grid-supervisor",
        "unknown-area-supervisor", "integrator", "admin"])
@pytest.mark.parametrize("suffix", ["", "/events"], ids=["issue", "events"])
async def test_reading_an_issue_follows_scope(h: NeedleHandle, road_issue: dict[str, Any],
                                              who: tuple[str, str], status: int, suffix: str) -> None:
    r = await h.client.get(f"/v1/issues/{road_issue['id']}{suffix}", headers=h.auth(*who))
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        problem(r, status)


async def test_supervisor_of_another_district_cannot_read(needle_factory: Factory) -> None:
    hh: NeedleHandle = await needle_factory(DEMO_ORG, DEMO_RULES, services=("intake",))
    issue_id, _ = await report_ok(hh, road(title="定海的路"))
    for scope, status in [("area:zhoushan", 200), ("area:dinghai", 200), ("area:wuxing", 200),
                          ("area:putuo", 403), ("area:zhanmao", 403)]:
        for suffix in ("", "/events"):
            r = await hh.client.get(f"/v1/issues/{issue_id}{suffix}", headers=hh.auth("supervisor", scope))
            assert r.status_code == status, (scope, suffix, r.text)
    problem(await report(hh, road(), ("grid_worker", "area:zhanmao-g31")), 403)


async def test_unknown_issue_and_task_are_404_and_malformed_ids_422(h: NeedleHandle,
                                                                    road_issue: dict[str, Any]) -> None:
    problem(await h.client.get("/v1/issues/0123456789abcdefghjkmnpqrs", headers=h.auth(*ADMIN)), 404)
    problem(await h.client.get("/v1/issues/NOT.AN/ID", headers=h.auth(*ADMIN)), 404)
    problem(await h.client.post(f"/v1/tasks/{road_issue['id']}-9/acknowledge", headers=h.auth(*ROADS)), 404)
    problem(await h.client.post("/v1/tasks/no-such-task/acknowledge", headers=h.auth(*ROADS)), 422, "task_id")


# -- writes against the issue's state -----------------------------------------------------------------------------
async def test_if_match_on_resolve_on_site(needle_factory: Factory) -> None:
    hh: NeedleHandle = await needle_factory(services=("intake",))  # no router: the issue stays undispatched
    issue_id, r = await report_ok(hh, road(title="fixed it myself"))
    etag = r.headers["ETag"]
    url = f"/v1/issues/{issue_id}/resolve-on-site"

    body = problem(await hh.client.post(url, json={"note": "done"}, headers=hh.auth(*GW1) | {"If-Match": '"7"'}),
                   412, "If-Match")
    assert body.get("current_version") == 1
    problem(await hh.client.post(url, json={}, headers=hh.auth(*GW2) | {"If-Match": etag}), 403)
    problem(await hh.client.post(url, json={}, headers=hh.auth(*ROADS) | {"If-Match": etag}), 403)

    ok = await hh.client.post(url, json={"note": "filled the hole"}, headers=hh.auth(*GW1) | {"If-Match": etag})
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "closed" and ok.json()["tasks"] == []
    assert ok.headers["ETag"] == f'"{ok.json()["version"]}"' != etag

    problem(await hh.client.post(url, json={}, headers=hh.auth(*GW1) | {"If-Match": etag}), 412, "If-Match")
    again = problem(await hh.client.post(url, json={}, headers=hh.auth(*GW1) | {"If-Match": ok.headers["ETag"]}),
                    409)
    assert again.get("current_status") == "closed"
    assert short(await events_of(hh, issue_id)) == ["issue.reported", "issue.resolved_on_site", "issue.closed"]


async def test_resolve_on_site_of_a_dispatched_issue_is_409(h: NeedleHandle) -> None:
    issue_id, _ = await report_ok(h, road(title="already with the departments"))
    issue, _ = await dispatched(h, issue_id)
    r = await h.client.post(f"/v1/issues/{issue_id}/resolve-on-site", json={}, headers=h.auth(*GW1))
    body = problem(r, 409)
    assert body.get("current_status") == issue["status"] == "dispatched"


async def test_task_lifecycle_acknowledge_resolve_verify_feedback(h: NeedleHandle) -> None:
    issue_id, _ = await report_ok(h, road(title="lifecycle"))
    issue, _ = await dispatched(h, issue_id)
    tasks = {t["department"]: t for t in issue["tasks"]}
    lead, co = tasks["dinghai-roads"], tasks["dinghai-police"]
    assert lead["role"] == "lead" and co["role"] == "co" and lead["status"] == "dispatched"
    assert lead["acknowledge_due"] and lead["resolve_due"]
    ack_url = f"/v1/tasks/{lead['id']}/acknowledge"

    problem(await h.client.post(ack_url, headers=h.auth(*POLICE)), 403)  # another department's task
    problem(await h.client.post(ack_url, headers=h.auth(*GW1)), 403)
    problem(await h.client.post(ack_url, headers=h.auth(*SUP_DINGHAI)), 403)
    problem(await h.client.post(ack_url, headers=h.auth(*ROADS) | {"If-Match": '"1"'}), 412, "If-Match")
    problem(await h.client.post(f"/v1/issues/{issue_id}/verify", json={"passed": True}, headers=h.auth(*GW1)), 409)

    r = await h.client.post(ack_url, headers=h.auth(*ROADS) | {"If-Match": f'"{issue["version"]}"'})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "acknowledged" and r.json()["acknowledged_at"]
    assert r.json()["issue"]["status"] == "in_progress"

    again = problem(await h.client.post(ack_url, headers=h.auth(*ROADS)), 409)
    assert again.get("current_status") == "acknowledged"

    r = await h.client.post(f"/v1/tasks/{co['id']}/acknowledge", headers=h.auth(*POLICE))
    assert r.status_code == 200, r.text

    r = await h.client.post(f"/v1/tasks/{lead['id']}/resolve", json={"note": "resurfaced"}, headers=h.auth(*ROADS))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "resolved" and r.json()["issue"]["status"] == "resolved"

    verify = f"/v1/issues/{issue_id}/verify"
    problem(await h.client.post(verify, json={"passed": True}, headers=h.auth(*GW2)), 403)
    problem(await h.client.post(verify, json={"passed": True}, headers=h.auth(*ROADS)), 403)
    problem(await h.client.post(verify, json={"passed": "maybe"}, headers=h.auth(*GW1)), 422, "passed")
    r = await h.client.post(verify, json={"passed": True, "note": "looks good"}, headers=h.auth(*GW1))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "closed" and r.json()["closed_at"]

    feedback = f"/v1/issues/{issue_id}/feedback"
    problem(await h.client.post(feedback, json={"satisfaction": "ecstatic"}, headers=h.auth(*GW1)), 422,
            "satisfaction")
    r = await h.client.post(feedback, json={"satisfaction": "satisfied"}, headers=h.auth(*GW1))
    assert r.status_code == 200, r.text
    assert r.json()["satisfaction"] == "satisfied"

    late = problem(await h.client.post(f"/v1/tasks/{co['id']}/resolve", json={}, headers=h.auth(*POLICE)), 409)
    assert late.get("current_status") == "closed"
    assert short(await events_of(h, issue_id))[4:] == [
        "task.acknowledged", "task.acknowledged", "task.resolved", "issue.verified", "issue.closed",
        "issue.feedback_recorded"]


# -- read models: handler inbox, supervisor lists, stats ----------------------------------------------------------
async def test_handler_inbox_lists_its_dispatched_tasks_read_your_write(needle: NeedleHandle) -> None:
    h2 = needle
    issue_id, _ = await report_ok(h2, road(title="inbox"))
    _, seq = await dispatched(h2, issue_id)

    async def inbox(who: tuple[str, str], status: str, min_seq: int) -> list[dict[str, Any]]:
        r = await h2.client.get("/v1/tasks", params={"status": status},
                                headers=h2.auth(*who) | {"Needle-Min-Seq": str(min_seq)})
        assert r.status_code == 200, r.text
        assert int(r.headers["Needle-Seq"]) >= min_seq
        items: list[dict[str, Any]] = r.json()["items"]
        return items

    roads = await inbox(ROADS, "dispatched", seq)
    assert [(t["id"], t["department"], t["status"]) for t in roads] == [(f"{issue_id}-1", "dinghai-roads",
                                                                       "dispatched")]
    assert [t["id"] for t in await inbox(POLICE, "dispatched", seq)] == [f"{issue_id}-2"]
    r = await h2.client.get("/v1/tasks", params={"department": "dinghai-police"}, headers=h2.auth(*ROADS))
    assert [t["department"] for t in r.json()["items"]] == ["dinghai-roads"]  # a handler sees its own inbox only
    assert await inbox(COMMITTEE, "dispatched", seq) == []

    ack = await h2.client.post(f"/v1/tasks/{issue_id}-1/acknowledge", headers=h2.auth(*ROADS))
    assert ack.status_code == 200, ack.text
    ack_seq = int(ack.headers["Needle-Seq"])
    assert await inbox(ROADS, "dispatched", ack_seq) == []
    assert [t["id"] for t in await inbox(ROADS, "acknowledged", ack_seq)] == [f"{issue_id}-1"]
    assert [t["id"] for t in await inbox(ROADS, "dispatched,acknowledged", ack_seq)] == [f"{issue_id}-1"]
    problem(await h2.client.get("/v1/tasks", headers=h2.auth(*SUP_DINGHAI)), 403)
    problem(await h2.client.get("/v1/tasks", headers=h2.auth(*GW1)), 403)


async def test_supervisor_lists_issues_with_filters_keyset_pages_and_csv(needle: NeedleHandle) -> None:
    h2 = needle
    roads = [(await report_ok(h2, road(title=f"road {i}")))[0] for i in range(4)]
    disputes = [(await report_ok(h2, dispute(title=f"dispute {i}"), GW2))[0] for i in range(3)]
    seq = max([(await dispatched(h2, i))[1] for i in roads + disputes])
    sup = h2.auth(*SUP_DINGHAI) | {"Needle-Min-Seq": str(seq)}

    async def listing(**params: Any) -> dict[str, Any]:
        r = await h2.client.get("/v1/issues", params=params, headers=sup)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    everything = (await listing(area="wuxing"))["items"]
    assert sorted(i["id"] for i in everything) == sorted(roads + disputes)
    assert [i["reported_at"] for i in everything] == sorted((i["reported_at"] for i in everything), reverse=True)
    assert {i["id"] for i in (await listing())["items"]} == set(roads + disputes)  # default: own area
    assert {i["id"] for i in (await listing(area="wuxing", category="road_damage"))["items"]} == set(roads)
    assert {i["id"] for i in (await listing(area="wuxing-g2"))["items"]} == set(disputes)
    assert {i["id"] for i in (await listing(area="wuxing", status="dispatched"))["items"]} == set(roads + disputes)
    assert (await listing(area="wuxing", status="closed"))["items"] == []
    assert (await listing(area="wuxing", overdue="true"))["items"] == []

    ack = await h2.client.post(f"/v1/tasks/{roads[0]}-1/acknowledge", headers=h2.auth(*ROADS))
    assert ack.status_code == 200, ack.text
    sup["Needle-Min-Seq"] = ack.headers["Needle-Seq"]
    assert [i["id"] for i in (await listing(area="wuxing", status="in_progress"))["items"]] == [roads[0]]
    assert {i["id"] for i in (await listing(area="wuxing", status="in_progress,dispatched",
                                            category="road_damage"))["items"]} == set(roads)

    seen: list[str] = []
    pages: list[int] = []
    cursor: str | None = None
    while True:
        page = await listing(area="wuxing", limit=3, **({"cursor": cursor} if cursor else {}))
        seen += [i["id"] for i in page["items"]]
        pages.append(len(page["items"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 10, "pagination does not end"
    assert pages == [3, 3, 1]
    assert seen == [i["id"] for i in everything]  # each once, in the same order

    r = await h2.client.get("/v1/issues", params={"area": "wuxing", "format": "csv"}, headers=sup)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    lines = r.text.strip().splitlines()
    header = lines[0].split(",")
    assert {"id", "status", "category", "grid"} <= set(header)
    assert len(lines) == 1 + 7
    r = await h2.client.get("/v1/issues", params={"area": "wuxing"}, headers=sup | {"Accept": "text/csv"})
    assert r.headers["content-type"].startswith("text/csv")

    problem(await h2.client.get("/v1/issues", params={"area": "dinghai"}, headers=h2.auth(*SUP_WUXING)), 403)
    problem(await h2.client.get("/v1/issues", params={"area": "nowhere"}, headers=h2.auth(*SUP_DINGHAI)), 422,
            "area")
    problem(await h2.client.get("/v1/issues", params={"cursor": "!!!"}, headers=h2.auth(*SUP_DINGHAI)), 422,
            "cursor")
    problem(await h2.client.get("/v1/issues", params={"limit": 0}, headers=h2.auth(*SUP_DINGHAI)), 422, "limit")
    problem(await h2.client.get("/v1/issues", headers=h2.auth(*ROADS)), 403)
    problem(await h2.client.get("/v1/issues", params={"area": "wuxing-g1"}, headers=h2.auth(*GW2)), 403)
    own = await h2.client.get("/v1/issues", headers=h2.auth(*GW1) | {"Needle-Min-Seq": str(seq)})
    assert {i["id"] for i in own.json()["items"]} == set(roads)  # a grid worker lists its own grid


async def test_stats_return_rates_with_their_counts(needle: NeedleHandle) -> None:
    h2 = needle
    first, _ = await report_ok(h2, road(title="stats 1"))
    second, _ = await report_ok(h2, road(title="stats 2"))
    await dispatched(h2, first)
    await dispatched(h2, second)
    for path, who, body in [(f"/v1/tasks/{first}-1/acknowledge", ROADS, None),
                            (f"/v1/tasks/{first}-1/resolve", ROADS, {"note": "done"}),
                            (f"/v1/issues/{first}/verify", GW1, {"passed": True}),
                            (f"/v1/issues/{first}/feedback", GW1, {"satisfaction": "satisfied"})]:
        r = await h2.client.post(path, json=body, headers=h2.auth(*who))
        assert r.status_code == 200, r.text
    seq = r.headers["Needle-Seq"]

    r = await h2.client.get("/v1/stats", params={"area": "dinghai"},
                            headers=h2.auth(*SUP_DINGHAI) | {"Needle-Min-Seq": seq})
    assert r.status_code == 200, r.text
    stats = r.json()
    overall = stats["overall"]
    counts = overall["counts"]
    assert counts["reported"] == 2 and counts["issues_dispatched"] == 2
    assert counts["closed"] == 1 and counts["feedback"] == 1 and counts["feedback_satisfied"] == 1
    for name, rate in overall["rates"].items():  # every rate carries the counts behind it
        num, den = rate["numerator"], rate["denominator"]
        assert rate["value"] is None if den == 0 else rate["value"] == pytest.approx(num / den, abs=1e-3), name
    assert (overall["rates"]["resolution_rate"]["numerator"], overall["rates"]["resolution_rate"]["denominator"]) \
        == (1, 1)  # the second issue is not yet due: in no denominator (issues_resolve_due)
    assert overall["rates"]["satisfaction_rate"]["value"] == pytest.approx(1.0)
    assert overall["rates"]["response_rate"]["numerator"] == 1
    roads_stats = stats["departments"]["dinghai-roads"]
    assert roads_stats["counts"]["tasks_dispatched"] == 2 and roads_stats["counts"]["tasks_resolved"] == 1
    assert stats["areas"]["huannan"]["counts"]["reported"] == 2

    r = await h2.client.get("/v1/stats", headers=h2.auth(*SUP_WUXING) | {"Needle-Min-Seq": seq})
    assert r.status_code == 200 and r.json()["overall"]["counts"]["reported"] == 2
    problem(await h2.client.get("/v1/stats", headers=h2.auth(*ROADS)), 403)
    problem(await h2.client.get("/v1/stats", headers=h2.auth(*GW1)), 403)
    problem(await h2.client.get("/v1/stats", params={"area": "dinghai"}, headers=h2.auth(*SUP_WUXING)), 403)


async def test_needle_min_seq_far_ahead_is_503_with_retry_after(h: NeedleHandle) -> None:
    """Acceptably slow (~5 s): the read models are waited for, bounded, before giving up."""
    t0 = time.monotonic()
    r = await h.client.get("/v1/issues", headers=h.auth(*SUP_DINGHAI) | {"Needle-Min-Seq": str(10**12)})
    elapsed = time.monotonic() - t0
    problem(r, 503, "Needle-Min-Seq")
    assert int(r.headers["Retry-After"]) >= 0
    assert 4.0 <= elapsed <= 7.0, elapsed


async def test_healthz_is_200_with_its_components(needle: NeedleHandle) -> None:
    r = await needle.client.get("/healthz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["down"] == []
    assert {"nats", "postgres", "projections", "router"} <= set(body["components"])
    assert all(body["components"].values())


async def test_a_nul_character_in_a_report_does_not_poison_the_read_models(needle: NeedleHandle) -> None:
    h2 = needle
    r = await report(h2, road(title="nul\u0000byte", description="d\u0000"))
    assert r.status_code in (201, 422), r.text
    issue_id, _ = await report_ok(h2, road(title="the next report"))
    deadline = time.monotonic() + 5
    while True:  # the next report reaches the read models, and they stay healthy
        health = await h2.client.get("/healthz")
        assert health.status_code == 200, health.text
        listed = await h2.client.get("/v1/issues", params={"area": "wuxing"}, headers=h2.auth(*SUP_DINGHAI))
        assert listed.status_code == 200, listed.text
        if issue_id in {i["id"] for i in listed.json()["items"]}:
            break
        assert time.monotonic() < deadline, "the read models never showed the next report"
        await asyncio.sleep(0.05)
