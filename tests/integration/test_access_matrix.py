"""Who may do what, route by route: every route of the app (enumerated from the FastAPI app itself, so a
new route without an entry here fails) × every kind of caller, against one real needle stack.

Callers: grid workers of grids A and B, handlers of the lead department X, of the co-handling department
Y and of a department Z with no task, a supervisor of the street over both grids and one of grid B only,
an integrator, an admin, a public app's reporter key, and no / an expired / a revoked token. The issue under
test lies in grid A and is dispatched to X (lead) and Y (co).

An expected ``OK`` means the caller got past authentication and authorization: a 2xx, or for a write a
409 (allowed, but the issue's state has moved on: earlier callers in the matrix act on the same issue).
Authorization is always decided before the state (403 before 409), so a denied cell is exactly 403/401.
Every 2xx write to an issue is checked to have recorded the caller's token subject as the event's actor.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import iter_route_contexts

from shared import auth
from shared.store.revocations import open_bucket, revoke_token
from tests.photos import png_bytes
from tests.support import NeedleHandle, module_needle

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OK = "ok"
GRID_A, GRID_B = "wuxing-g1", "wuxing-g2"
PRINCIPALS: dict[str, tuple[str, str]] = {
    "gw_a": ("grid_worker", f"area:{GRID_A}"),
    "gw_b": ("grid_worker", f"area:{GRID_B}"),
    "handler_x": ("handler", "dept:dinghai-roads"),  # the lead of the issue's tasks
    "handler_y": ("handler", "dept:dinghai-police"),  # co-handler: reads the issue, never acts on X's task
    "handler_z": ("handler", "dept:wuxing-committee"),  # no task on the issue
    "center": ("handler", "dept:dinghai-center"),  # the command centre of the owner area (dinghai): no task
    "sup_street": ("supervisor", "area:huannan"),  # the street over both grids
    "sup_other": ("supervisor", f"area:{GRID_B}"),  # covers grid B only
    "integrator": ("integrator", ""),
    "admin": ("admin", ""),
    "reporter": ("reporter", ""),  # a public app: files Open311 requests, reads nothing beyond the public view
}
BAD = ("none", "expired", "revoked")
CALLERS = (*PRINCIPALS, *BAD)


def public() -> dict[str, Any]:
    return dict.fromkeys(CALLERS, OK)


def only(*who: str, others: int = 403, bad: int = 401, **special: Any) -> dict[str, Any]:
    """``who`` get OK, the other token holders ``others``, missing/expired/revoked tokens ``bad``."""
    out: dict[str, Any] = {p: OK if p in who else others for p in PRINCIPALS} | dict.fromkeys(BAD, bad)
    return out | special


@dataclass(frozen=True)
class Case:
    expect: dict[str, Any]
    json: Any = None
    data: dict[str, str] | None = None
    params: dict[str, str] | None = None
    token_in_query: str | None = None  # EventSource cannot send headers: the token rides in this parameter
    stream: bool = False  # Server-Sent Events: read the status and headers, then hang up
    fresh_hook: bool = False  # the route consumes its target: a new webhook for every allowed caller
    setup: str | None = None  # the route gets an issue of its own: "fresh" (dispatched), "requested" (the lead
    #                           asked for an extension) or "resolved" (the lead resolved its task)
    succeeds: bool = False  # the first allowed caller's write must be a 2xx (its actor is then checked)
    content: bytes | None = None  # a raw body (a photo), sent with ``content_type``
    content_type: str | None = None


# the command centre of the owner area reads what it triages, reassigns and comments on
TRIAGERS = ("center", "sup_street", "admin")
ISSUE_READERS = ("gw_a", "handler_x", "handler_y", "center", "sup_street", "integrator", "admin")
REPORT = {"grid": GRID_A, "category": "road_damage", "title": "matrix report"}
PHOTO = png_bytes()  # the matrix issue's before-photo; uploading it again is the same medium
WRITERS = ("gw_a", "gw_b", "handler_x", "handler_y", "handler_z", "center", "sup_street", "sup_other", "admin")
UNTIL = (datetime.now(UTC) + timedelta(days=10)).isoformat()  # a suspension's review date
HOOK = {"url": "http://127.0.0.1:9/hook", "types": ["issue_reported"], "secret": "matrix-secret-0123456789"}

# (method, path as the app declares it) -> what each caller gets
MATRIX: dict[tuple[str, str], Case] = {
    # public documents and the dashboard shell (no data in them)
    ("GET", "/openapi.json"): Case(public()),
    ("GET", "/docs"): Case(public()),
    ("GET", "/docs/oauth2-redirect"): Case(public()),
    ("GET", "/redoc"): Case(public()),
    ("GET", "/docs/static/{name}"): Case(public()),  # Swagger UI / ReDoc assets from the package (offline)
    ("GET", "/app/"): Case(public()),  # the working pages' shell and assets (the token stays in the tab)
    ("GET", "/app/static/{name}"): Case(public()),
    ("GET", "/healthz"): Case(public()),
    ("GET", "/metrics"): Case(public()),  # open unless NEEDLE_METRICS_TOKEN is set (test_observability.py)
    ("GET", "/v1/schemas"): Case(public()),
    ("GET", "/v1/schemas/{ce_type}"): Case(public()),
    ("GET", "/dashboard"): Case(public()),
    ("GET", "/dashboard/static/{name}"): Case(public()),
    # one issue: a grid worker never reads another grid's issue; a handler only with a task on it
    ("GET", "/v1/issues/{issue_id}"): Case(only(*ISSUE_READERS)),
    ("GET", "/v1/issues/{issue_id}/events"): Case(only(*ISSUE_READERS)),
    ("GET", "/v1/issues/{issue_id}/audit"): Case(only("sup_street", "admin")),
    # read models
    ("GET", "/v1/issues"): Case(only("gw_a", "gw_b", "sup_street", "sup_other", "admin")),  # each its own area
    ("GET", "/v1/overdue"): Case(only("gw_a", "gw_b", "sup_street", "sup_other", "admin")),
    ("GET", "/v1/tasks"): Case(only("handler_x", "handler_y", "handler_z", "center", "admin"),
                               params={"department": "dinghai-roads"}),  # admins name one; handlers get theirs
    ("GET", "/v1/stats"): Case(only("sup_street", "sup_other", "admin")),
    ("GET", "/v1/stats/series"): Case(only("sup_street", "sup_other", "admin")),
    ("GET", "/dashboard/org"): Case(only("sup_street", "sup_other", "admin")),
    ("GET", "/v1/map"): Case(only("gw_a", "gw_b", "sup_street", "sup_other", "admin")),
    ("GET", "/dashboard/stream"): Case(only("sup_street", "sup_other", "admin"), token_in_query="access_token",
                                       stream=True),
    ("GET", "/v1/events/stream"): Case(only("integrator", "sup_street", "sup_other", "admin"), stream=True),
    # campaigns: a supervisor over the area (here: community wuxing, under the street)
    ("POST", "/v1/campaigns"): Case(only("sup_street", "admin"), succeeds=True,
                                    json={"area": "wuxing", "category": "road_damage", "title": "matrix campaign"}),
    ("GET", "/v1/campaigns/{cid}"): Case(only("sup_street", "admin"), params={"area": "wuxing"}),
    # household visits (走访): the grid's own people record (a grid worker over it; its grid_team's handlers,
    # see test_visits.py), they and the supervisors over it read
    ("POST", "/v1/visits"): Case(only("gw_a", "admin"), json={"grid": GRID_A, "household": "m-1"}, succeeds=True),
    ("GET", "/v1/visits"): Case(only("gw_a", "sup_street", "admin"), params={"grid": GRID_A}),
    ("GET", "/v1/visits/{visit_id}"): Case(only("gw_a", "sup_street", "admin")),
    ("GET", "/v1/visits/coverage"): Case(only("sup_street", "admin"), params={"area": "wuxing"}),
    # 考核: supervisors in scope (sup_other: its own grid, no departments there) and admins
    ("GET", "/v1/scores"): Case(only("sup_street", "sup_other", "admin"), params={"period": "2026-11"}),
    ("GET", "/v1/reports/monthly"): Case(only("sup_street", "sup_other", "admin"), params={"period": "2026-11"}),
    # the resident's 回访: the link is read by the grid's worker or a supervisor over it
    ("GET", "/v1/issues/{issue_id}/followup"): Case(only("gw_a", "sup_street", "admin"), setup="resolved"),
    # the link's page and answer: no login; the signed token decides, whoever bears a token (a forged one: 403)
    ("GET", "/f/{issue_id}/{token}"): Case(dict.fromkeys(CALLERS, 403)),
    ("POST", "/f/{issue_id}/{token}"): Case(dict.fromkeys(CALLERS, 403),
                                           json={"solved": True, "satisfaction": "satisfied"}),
    # grid workers' writes on the issue of grid A
    ("POST", "/v1/issues"): Case(only("gw_a", "admin"), json=REPORT, succeeds=True),
    # dispatched at once by the router: closing it at the grid is a 409 for whoever may ask
    ("POST", "/v1/issues/{issue_id}/resolve-on-site"): Case(only("gw_a", "admin"), json={"note": "m"},
                                                            setup="fresh"),
    ("POST", "/v1/issues/{issue_id}/verify"): Case(only("gw_a", "admin"), json={"passed": False, "note": "m"},
                                                   setup="resolved", succeeds=True),
    ("POST", "/v1/issues/{issue_id}/feedback"): Case(only("gw_a", "admin"), json={"satisfaction": "satisfied"},
                                                     setup="resolved", succeeds=True),
    ("POST", "/v1/issues/{issue_id}/escalate"): Case(only("gw_a", "sup_street", "admin"), json={"reason": "m"},
                                                     setup="fresh", succeeds=True),
    ("POST", "/v1/issues/{issue_id}/urge"): Case(only("sup_street", "admin"), json={"note": "m"}, setup="fresh",
                                                 succeeds=True),
    # comments (issue 19): every participant — the grid's worker, the departments with a task, the command centre
    # over the owner area, a supervisor over the grid; integrators read what they may read, nobody else
    ("POST", "/v1/issues/{issue_id}/comments"): Case(only("gw_a", "handler_x", "handler_y", "center", "sup_street",
                                                          "admin"), json={"text": "m"}, succeeds=True),
    ("GET", "/v1/issues/{issue_id}/comments"): Case(only("gw_a", "handler_x", "handler_y", "center", "sup_street",
                                                         "integrator", "admin")),
    # a handler of one department never acts on another's task (X holds it; Y co-handles the issue)
    ("POST", "/v1/tasks/{task_id}/acknowledge"): Case(only("handler_x", "admin"), setup="fresh", succeeds=True),
    ("POST", "/v1/tasks/{task_id}/return"): Case(only("handler_x", "admin"), json={"reason": "not ours"},
                                                 setup="fresh", succeeds=True),
    ("POST", "/v1/tasks/{task_id}/resolve"): Case(only("handler_x", "admin"), json={"note": "m"}, setup="fresh",
                                                  succeeds=True),
    ("POST", "/v1/tasks/{task_id}/extension"): Case(only("handler_x", "admin"),
                                                    json={"extension": "P1D", "reason": "m"}, setup="fresh",
                                                    succeeds=True),
    # extensions are decided by a supervisor over the owner area (dinghai): the street's may not (issue 19)
    ("POST", "/v1/tasks/{task_id}/extension/approve"): Case(only("admin"), setup="requested", succeeds=True),
    ("POST", "/v1/tasks/{task_id}/extension/reject"): Case(only("admin"), json={"reason": "m"}, setup="requested",
                                                           succeeds=True),
    # dispatch control (issue 19): the command centre of the owner area (or above) or a supervisor over it
    # reviews returns, reassigns and decides suspensions; the lead asks for a suspension and may resume
    ("POST", "/v1/tasks/{task_id}/return/reject"): Case(only("center", "admin"), json={"reason": "m"},
                                                        setup="return_requested", succeeds=True),
    ("POST", "/v1/tasks/{task_id}/return/approve"): Case(only("center", "admin"), json={"reason": "m"},
                                                         setup="return_requested", succeeds=True),
    ("POST", "/v1/tasks/{task_id}/reassign"): Case(only("center", "admin"), setup="fresh", succeeds=True,
                                                   json={"department": "dinghai-center", "reason": "m"}),
    ("POST", "/v1/tasks/{task_id}/suspend"): Case(only("handler_x", "admin"), setup="fresh", succeeds=True,
                                                  json={"reason": "m", "until": UNTIL}),
    ("POST", "/v1/tasks/{task_id}/suspend/approve"): Case(only("center", "admin"), setup="suspend_requested",
                                                          succeeds=True),
    ("POST", "/v1/tasks/{task_id}/suspend/reject"): Case(only("center", "admin"), json={"reason": "m"},
                                                         setup="suspend_requested", succeeds=True),
    ("POST", "/v1/tasks/{task_id}/supervise"): Case(only("center", "admin"), setup="fresh", succeeds=True,
                                                    json={"due": UNTIL, "reason": "m"}),
    ("POST", "/v1/tasks/{task_id}/resume"): Case(only("handler_x", "center", "admin"), setup="suspended",
                                                 succeeds=True),
    # integrators: their webhooks; never an issue write (above: 403 everywhere)
    ("POST", "/v1/media"): Case(only(*WRITERS), content=PHOTO, content_type="image/png", succeeds=True),
    ("GET", "/v1/media/{media_id}"): Case(only(*ISSUE_READERS)),
    # triage (受理): the owner area's command centre or a supervisor over the grid
    ("POST", "/v1/issues/{issue_id}/accept"): Case(only(*TRIAGERS), setup="fresh", succeeds=True),
    ("POST", "/v1/issues/{issue_id}/reject"): Case(only(*TRIAGERS), json={"reason": "m"}, setup="fresh",
                                                   succeeds=True),
    ("POST", "/v1/issues/{issue_id}/void"): Case(only(*TRIAGERS), json={"reason": "m"}, setup="fresh", succeeds=True),
    ("POST", "/v1/issues/{issue_id}/recategorise"): Case(only(*TRIAGERS), setup="fresh", succeeds=True,
                                                         json={"category": "neighbour_dispute", "reason": "m"}),
    # 合并办理: a fresh report merged into the matrix issue (``{issue_id}``: filled in by ``call``); its triagers
    # decide (README: the command centre or a supervisor)
    ("POST", "/v1/issues/{issue_id}/merge"): Case(only(*TRIAGERS), setup="fresh", succeeds=True,
                                                  json={"into": "{issue_id}", "reason": "m"}),
    ("GET", "/v1/issues/{issue_id}/similar"): Case(only(*ISSUE_READERS)),
    # the description in anonymous Open311 reads: a supervisor over the grid or an admin moderates; not the grid's
    # worker, nor a handler (with a task or the command centre), nor a supervisor of another grid
    ("POST", "/v1/issues/{issue_id}/publication"): Case(only("sup_street", "admin"), setup="fresh", succeeds=True,
                                                        json={"public": True, "reason": "m"}),
    ("POST", "/v1/webhooks"): Case(only("integrator", "admin"), json=HOOK, succeeds=True),
    ("GET", "/v1/webhooks"): Case(only("integrator", "admin")),
    ("GET", "/v1/webhooks/{hook_id}"): Case(only("integrator", "admin")),
    ("DELETE", "/v1/webhooks/{hook_id}"): Case(only("integrator", "admin"), fresh_hook=True),
    ("GET", "/v1/webhooks/{hook_id}/dead-letters"): Case(only("integrator", "admin")),
    ("POST", "/v1/webhooks/{hook_id}/dead-letters/replay"): Case(only("integrator", "admin")),
    # residents' personal data: only an admin forgets a resident (an unknown one: 204, nothing recorded)
    ("DELETE", "/v1/residents/{resident_id}"): Case(only("admin")),
    # Open311: public reads; submissions with an api_key of a grid worker (its own grid), integrator or admin,
    # refused in the GeoReport form (403, also for a missing or bad key)
    ("GET", "/open311/v2/discovery.{fmt}"): Case(public()),
    ("GET", "/open311/v2/services.{fmt}"): Case(public()),
    ("GET", "/open311/v2/services/{name}"): Case(public()),
    # requests: anyone without a key (the anonymous view), any valid key; a key that is sent must be valid
    ("GET", "/open311/v2/requests.{fmt}"): Case(public() | {"expired": 403, "revoked": 403}),
    ("GET", "/open311/v2/requests/{name}"): Case(public() | {"expired": 403, "revoked": 403}),
    ("GET", "/open311/v2/tokens/{name}"): Case(public() | {"expired": 403, "revoked": 403}),
    # files: a grid worker in its grid, a public app's reporter key, an admin; never an integrator (reads only)
    ("POST", "/open311/v2/requests.{fmt}"): Case(only("gw_a", "reporter", "admin", bad=403), succeeds=True,
                                                 data={"service_code": "road_damage", "description": "m",
                                                       "attribute[grid]": GRID_A}),
    # anything else under /open311 is a 404 in the GeoReport form, whoever asks
    ("GET", "/open311/{rest}"): Case(dict.fromkeys(CALLERS, 404)),
    ("GET", "/open311"): Case(dict.fromkeys(CALLERS, 404)),
}


def app_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves; HEAD/OPTIONS ride along with GET (and CORS)."""
    out = set()
    for rc in iter_route_contexts(app.routes):
        path = rc.path_format or rc.path
        methods = set(rc.methods or ()) - {"HEAD", "OPTIONS"}
        if methods >= {"GET", "POST", "PUT", "PATCH", "DELETE"}:  # a catch-all answers alike to every method
            methods = {"GET"}
        out |= {(m, path) for m in methods}
    return out


@dataclass
class World:
    issue: str = ""
    lead_task: str = ""
    cid: str = ""
    visit: str = ""
    hook: str = ""
    media: str = ""
    own: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)  # route -> (its issue, lead task)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    subjects: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> AsyncIterator[tuple[NeedleHandle, World]]:
    root = tmp_path_factory.mktemp("matrix")
    rules = root / "rules.yaml"  # the contract rulebook, with returns reviewed by the command centre (issue 19)
    rules.write_text((FIXTURES / "contract_rules.yaml").read_text() + "\nreturn: {approval: command_center}\n")
    async with module_needle(root, pg_url, "matrix", rules=rules,
                             webhook_allow_private=["127.0.0.1"]) as h:  # the webhooks' (dead) target
        yield h, await seed(h)


async def seed(h: NeedleHandle) -> World:
    w = World()
    key = auth.load_or_create_key(h.stack.settings.data_dir)
    for name, (role, scope) in PRINCIPALS.items():
        w.tokens[name] = auth.issue_token(key, role=role, scope=scope, subject=f"matrix-{name}")
        w.subjects[name] = f"matrix-{name}"
    w.tokens["expired"] = auth.issue_token(key, role="admin", scope="", ttl_s=60, now=time.time() - 7200)
    w.tokens["revoked"] = auth.issue_token(key, role="admin", scope="", subject="matrix-revoked")
    w.headers = {name: {"Authorization": f"Bearer {t}"} for name, t in w.tokens.items()} | {"none": {}}
    c, admin = h.client, w.headers["admin"]
    assert h.stack.nc is not None
    revoked = auth.TokenVerifier(key).verify(w.tokens["revoked"]).token_id
    await revoke_token(await open_bucket(h.stack.nc), revoked, at=time.time(), by="matrix")

    r = await c.post("/v1/media", content=PHOTO, headers=w.headers["gw_a"] | {"Content-Type": "image/png"})
    assert r.status_code == 201, r.text
    w.media = r.json()["id"]
    r = await c.post("/v1/issues", json=REPORT | {"title": "the matrix issue", "media": [
        {"id": w.media, "phase": "before"}]}, headers=w.headers["gw_a"])
    assert r.status_code == 201, r.text
    w.issue = r.json()["id"]
    issue = await h.wait_for(f"/v1/issues/{w.issue}", admin, lambda b: len(b["tasks"]) >= 2)
    tasks = {t["department"]: t for t in issue["tasks"]}
    assert tasks["dinghai-roads"]["role"] == "lead" and tasks["dinghai-police"]["role"] == "co", tasks
    w.lead_task = tasks["dinghai-roads"]["id"]
    r = await c.post("/v1/campaigns", json={"area": "wuxing", "category": "road_damage", "title": "seed"},
                     headers=admin)
    assert r.status_code == 202, r.text
    w.cid = r.json()["id"]
    r = await c.post("/v1/visits", json={"grid": GRID_A, "household": "seed"}, headers=w.headers["gw_a"])
    assert r.status_code == 201, r.text
    w.visit = r.json()["id"]
    w.hook = await new_hook(h, w)
    own = [key for key, case in MATRIX.items() if case.setup]
    prepared = await asyncio.gather(*(own_issue(h, w, MATRIX[key].setup or "") for key in own))
    w.own = dict(zip(own, prepared, strict=True))
    # the audit view reads the projection: wait until it holds the issue
    seq = r.headers["Needle-Seq"]
    await h.wait_for("/v1/issues?area=wuxing", admin | {"Needle-Min-Seq": seq}, lambda b: bool(b["items"]))
    deadline = time.monotonic() + 10
    while revoked not in h.stack.revocations.jtis:  # the follower applied the revocation
        assert time.monotonic() < deadline, "revocation not applied"
        await asyncio.sleep(0.02)
    return w


async def own_issue(h: NeedleHandle, w: World, setup: str) -> tuple[str, str]:
    """A dispatched issue of grid A for one route, brought to the state ``setup`` names."""
    r = await h.client.post("/v1/issues", json=REPORT | {"title": f"matrix {setup}"}, headers=w.headers["gw_a"])
    assert r.status_code == 201, r.text
    issue_id = r.json()["id"]
    body = await h.wait_for(f"/v1/issues/{issue_id}", w.headers["admin"], lambda b: len(b["tasks"]) >= 2)
    lead = next(t["id"] for t in body["tasks"] if t["role"] == "lead")
    x = w.headers["handler_x"]
    if setup == "requested":
        r = await h.client.post(f"/v1/tasks/{lead}/extension", json={"extension": "P1D", "reason": "m"}, headers=x)
        assert r.status_code == 200, r.text
    elif setup == "return_requested":
        r = await h.client.post(f"/v1/tasks/{lead}/return", json={"reason": "m"}, headers=x)
        assert r.status_code == 200 and r.json()["return_requested"] == "m", r.text
    elif setup in ("suspend_requested", "suspended"):
        r = await h.client.post(f"/v1/tasks/{lead}/suspend", json={"reason": "m", "until": UNTIL}, headers=x)
        assert r.status_code == 200, r.text
        if setup == "suspended":
            r = await h.client.post(f"/v1/tasks/{lead}/suspend/approve", headers=w.headers["admin"])
            assert r.status_code == 200 and r.json()["suspended"], r.text
    elif setup == "resolved":
        r = await h.client.post(f"/v1/tasks/{lead}/resolve", json={"note": "done"}, headers=x)
        assert r.status_code == 200 and r.json()["issue"]["status"] == "resolved", r.text
    return issue_id, lead


async def new_hook(h: NeedleHandle, w: World) -> str:
    r = await h.client.post("/v1/webhooks", json=HOOK, headers=w.headers["integrator"])
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def fill(method: str, path: str, w: World) -> str:
    issue_id, task_id = w.own.get((method, path), (w.issue, w.lead_task))
    values = {"issue_id": issue_id, "task_id": task_id, "cid": w.cid, "hook_id": w.hook, "visit_id": w.visit,
              "ce_type": "needle.issue.reported.v1", "fmt": "json", "name": "road_damage.json",
              "rest": "v3/whatever", "resident_id": "res_matrix", "media_id": w.media,
              "token": "4102444800.forged-signature-000000"}
    if path.startswith("/open311/v2/requests/") or path.startswith("/open311/v2/tokens/"):
        values["name"] = f"{w.issue}.json"
    if path.startswith("/dashboard/static/") or path.startswith("/app/static/"):
        values["name"] = "app.js"
    if path.startswith("/docs/static/"):
        values["name"] = "swagger-ui.css"
    return path.format(**values)


async def call(h: NeedleHandle, w: World, method: str, path: str, case: Case, who: str) -> httpx.Response:
    headers = dict(w.headers[who])
    params = dict(case.params or {})
    if case.token_in_query and headers:
        params[case.token_in_query] = headers.pop("Authorization").removeprefix("Bearer ")
    if case.fresh_hook:
        path = path.replace(w.hook, await new_hook(h, w))
    kwargs: dict[str, Any] = {"headers": headers, "params": params}
    if case.json is not None:
        kwargs["json"] = case.json
        if isinstance(case.json, dict) and case.json.get("into") == "{issue_id}":
            kwargs["json"] = case.json | {"into": w.issue}  # merge: into the matrix issue
    if case.data is not None:
        kwargs["data"] = case.data
    if case.content is not None:
        kwargs["content"] = case.content
        headers["Content-Type"] = case.content_type or "application/octet-stream"
    if case.stream:
        async with h.client.stream(method, path, **kwargs) as r:
            return r  # status and headers only: the body never ends
    return await h.client.request(method, path, **kwargs)


def test_every_route_of_the_app_has_a_matrix_entry(stack: tuple[NeedleHandle, World]) -> None:
    h, _ = stack
    assert h.server is not None
    routes = app_routes(h.server.config.app)
    assert routes - set(MATRIX) == set(), "routes without an access-matrix entry: add them to MATRIX"
    assert set(MATRIX) - routes == set(), "matrix entries for routes the app no longer has"
    assert all(set(case.expect) == set(CALLERS) for case in MATRIX.values())


# denied callers first, so that allowed writes (which move the issue on) never change a denied cell's question
ORDER = sorted(CALLERS, key=lambda c: c in ("gw_a", "handler_x", "sup_street", "center", "integrator", "admin"))


@pytest.mark.parametrize(("method", "path"), list(MATRIX), ids=[f"{m} {p}" for m, p in MATRIX])
async def test_each_caller_gets_what_the_matrix_says(stack: tuple[NeedleHandle, World], method: str,
                                                     path: str) -> None:
    h, w = stack
    case = MATRIX[(method, path)]
    url = fill(method, path, w)
    wrong, succeeded = [], False
    for who in ORDER:
        want = case.expect[who]
        r = await call(h, w, method, url, case, who)
        if want == OK:
            good = 200 <= r.status_code < 300 or (method != "GET" and r.status_code == 409)
        else:
            good = r.status_code == want
        if not good:
            body = "" if case.stream else r.text[:300]
            wrong.append(f"{who}: expected {want}, got {r.status_code} {body}")
        elif want in (401, 403) and not path.startswith("/open311"):
            assert r.headers["content-type"] == "application/problem+json", (who, r.headers)
        if want == OK and 200 <= r.status_code < 300:
            succeeded = True
            if method != "GET" and "Needle-Seq" in r.headers:
                await assert_actor(h, w, r, who, url)
    assert not wrong, "\n".join(wrong)
    assert succeeded or not case.succeeds, "no allowed caller's write went through"


async def assert_actor(h: NeedleHandle, w: World, r: httpx.Response, who: str, url: str) -> None:
    """The audit trail: the event a write appended names the caller's token subject as its actor."""
    if r.headers.get("Idempotent-Replayed") == "true":
        return  # a decision already recorded (by an earlier caller): the write appended nothing
    location = r.headers.get("Location", "")
    issue_id = next((i for i, _ in w.own.values() if i in url), w.issue)
    if location.startswith("/v1/issues/"):
        issue_id = location.removeprefix("/v1/issues/")
    elif location.startswith("/open311/v2/requests/"):
        issue_id = location.removeprefix("/open311/v2/requests/").rsplit(".", 1)[0]
    elif location.startswith("/v1/campaigns/"):
        return  # checked per issue in test_campaign_issues_name_their_supervisor
    elif location.startswith("/v1/visits/"):
        visit = await h.client.get(location, headers=w.headers["admin"] | {"Needle-Min-Seq": r.headers["Needle-Seq"]})
        assert visit.status_code == 200 and visit.json()["by"] == w.subjects[who], (who, visit.text)
        return
    events = (await h.client.get(f"/v1/issues/{issue_id}/events", headers=w.headers["admin"])).json()
    seq = int(r.headers["Needle-Seq"])
    written = [e for e in events if e["sequence"] == seq]
    assert written, (who, seq, [e["sequence"] for e in events])
    assert written[0].get("actor") == w.subjects[who], (who, written[0])


async def test_campaign_issues_name_their_supervisor(stack: tuple[NeedleHandle, World]) -> None:
    h, w = stack
    r = await h.client.post("/v1/campaigns", json={"area": "wuxing", "category": "road_damage", "title": "who"},
                            headers=w.headers["sup_street"])
    assert r.status_code == 202, r.text
    body = (await h.client.get(f"/v1/campaigns/{r.json()['id']}", params={"area": "wuxing"},
                               headers=w.headers["sup_street"])).json()
    for item in body["items"]:
        events = (await h.client.get(f"/v1/issues/{item['id']}/events", headers=w.headers["admin"])).json()
        reported = [e for e in events if e["type"] == "needle.issue.reported.v1"]
        assert reported and reported[0]["actor"] == w.subjects["sup_street"], reported


async def test_the_audit_view_shows_each_writer(stack: tuple[NeedleHandle, World]) -> None:
    h, w = stack
    r = await h.client.post(f"/v1/issues/{w.issue}/urge", json={"note": "audit"}, headers=w.headers["sup_street"])
    assert r.status_code == 200, r.text
    body = await h.wait_for(f"/v1/issues/{w.issue}/audit", w.headers["admin"] | {"Needle-Min-Seq": "0"},
                            lambda b: any(i.get("seq") == int(r.headers["Needle-Seq"]) for i in b["items"]))
    row = next(i for i in body["items"] if i["seq"] == int(r.headers["Needle-Seq"]))
    assert (row["type"], row["actor"]) == ("issue_urged", w.subjects["sup_street"]), row


async def test_by_default_no_origin_is_allowed_and_the_dashboard_keeps_its_own_csp(
        stack: tuple[NeedleHandle, World]) -> None:
    h, _ = stack  # this stack runs the default settings (CORS with NEEDLE_CORS_ORIGINS: test_security.py)
    r = await h.client.options("/v1/issues", headers={"Origin": "https://ops.example.org",
                                                      "Access-Control-Request-Method": "GET"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    page = await h.client.get("/dashboard")
    assert page.status_code == 200
    csp = page.headers.get_list("content-security-policy")
    assert len(csp) == 1 and "script-src 'self'" in csp[0] and "'unsafe-inline'" not in csp[0]
    assert page.headers["x-frame-options"] == "DENY"


# Open311 reads: the full request (description, exact point and address, notes) only to a key that covers the
# issue; everyone else, no key included, gets the anonymous view (docs/OPEN311.md)
OPEN311_FULL = {"gw_a", "handler_x", "handler_y", "sup_street", "integrator", "admin"}


@pytest.mark.parametrize("who", [c for c in CALLERS if c not in ("expired", "revoked")])
async def test_open311_reads_show_full_detail_only_to_a_key_covering_the_issue(
        stack: tuple[NeedleHandle, World], who: str) -> None:
    h, w = stack
    r = await h.client.get(f"/open311/v2/requests/{w.issue}.json", headers=w.headers[who])
    assert r.status_code == 200, r.text
    (req,) = r.json()
    assert (req["description"] is not None) == (who in OPEN311_FULL), (who, req)
