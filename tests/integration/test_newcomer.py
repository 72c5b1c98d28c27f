"""What a newcomer trips over, answered clearly: malformed JSON names the body (not a character offset as a
field), every /v1 timestamp is RFC 3339 UTC with "Z", and a token of another data dir says what to check."""
from __future__ import annotations

import re
from typing import Any

from shared import auth
from tests.support import NeedleHandle, report

RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def timestamps(body: Any) -> list[str]:
    """Every string in ``body`` that looks like a date-time."""
    if isinstance(body, dict):
        return [t for v in body.values() for t in timestamps(v)]
    if isinstance(body, list):
        return [t for v in body for t in timestamps(v)]
    return [body] if isinstance(body, str) and re.match(r"^\d{4}-\d\d-\d\dT", body) else []


async def test_malformed_json_names_the_body_and_where_it_broke(needle: NeedleHandle) -> None:
    r = await needle.client.post("/v1/issues", content=b'{"grid": "wuxing-g1", ',
                                 headers=needle.auth("grid_worker", "area:wuxing-g1") | {
                                     "Content-Type": "application/json", "Idempotency-Key": "k-malformed"})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["field"] == "body" and "malformed JSON at character" in body["detail"], body


async def test_v1_timestamps_are_utc_with_z_everywhere(needle: NeedleHandle) -> None:
    issue_id = await report(needle, "road_damage")
    handler = needle.auth("handler", "dept:dinghai-roads")
    issue = await needle.wait_for(f"/v1/issues/{issue_id}", needle.auth("admin"), lambda b: bool(b["tasks"]))
    tasks = await needle.wait_for("/v1/tasks", handler, lambda b: bool(b["items"]))
    listed = await needle.wait_for("/v1/issues?area=dinghai", needle.auth("supervisor", "area:dinghai"),
                                   lambda b: bool(b["items"]))
    seen = timestamps(issue) + timestamps(tasks) + timestamps(listed)
    assert len(seen) >= 8, seen
    assert [t for t in seen if not RFC3339_Z.match(t)] == []


async def test_a_token_of_another_data_dir_says_what_to_check(needle: NeedleHandle) -> None:
    foreign = auth.issue_token(b"another-needle-key-0123456789abcdef", role="admin", scope="")
    r = await needle.client.get("/v1/issues/0123456789abcdefghjkmnpqrs", headers={"Authorization": f"Bearer {foreign}"})
    assert r.status_code == 401
    assert "does not match this needle's key" in r.json()["detail"] and "--data-dir" in r.json()["detail"]
