"""The security review's fixes (issue 17), over real HTTP, NATS and Postgres: path ids that could be NATS
wildcards, what Open311 shows without a key, webhook targets, who files what, CSV cells, and the small ones.
Every test here failed on the code before the fix."""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import NeedleHandle, start_needle

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
    from shared.runtime.embedded import EmbeddedNats

    root = tmp_path_factory.mktemp("hardening")
    server = EmbeddedNats(root / "nats-data")
    server.start()
    handle = await start_needle(root / "needle", org=FIXTURES / "contract_org.yaml",
                                rules=FIXTURES / "contract_rules.yaml", nats_url=server.url, pg_admin_url=pg_url,
                                database=f"needle_hardening_{os.getpid()}_{uuid.uuid4().hex[:8]}")
    try:
        yield handle
    finally:
        with contextlib.suppress(Exception):
            await handle.close()
        server.stop()


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
