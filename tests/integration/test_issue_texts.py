"""Issues' free text sealed with per-issue data keys, and the retention policy that crypto-shreds it (issue 17,
item 10): what the stream holds, what readers see, what a shred leaves, and that a rebuild agrees."""
from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.js.errors import KeyNotFoundError

from services.projections.rebuild import rebuild
from services.projections.retention import shred_issue
from services.projections.worker import ProjectionWriter
from shared.domain.errors import Conflict
from shared.events import subjects as sj
from shared.privacy.issuekeys import PREFIX
from shared.privacy.keystore import BUCKET, KV_STREAM
from shared.privacy.texts import ERASED, SEALED
from tests.support import NeedleHandle

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GW1 = ("grid_worker", "area:wuxing-g1")
ROADS = ("handler", "dept:dinghai-roads")
ADMIN = ("admin", "")
TITLE = "积水 outside No. 17 Lane 4, Mrs Wang's door"
DESCRIPTION = "Mrs Wang (138 0013 8000) says the drain has been blocked since Monday"
POINT = {"lat": 30.0123456, "lon": 122.1065432, "address": "No. 17 Lane 4, Wuxing"}


def rules_with_retention(tmp: Path, period: str) -> Path:
    path = tmp / "rules.yaml"
    path.write_text((FIXTURES / "contract_rules.yaml").read_text("utf-8") + f"retention: {{closed_text: {period}}}\n",
                    "utf-8")
    return path


async def raw_events(h: NeedleHandle, issue_id: str) -> list[tuple[str, bytes]]:
    js = h.stack.nc.jetstream()  # type: ignore[union-attr]
    sub = await js.subscribe(sj.issue_events(issue_id), ordered_consumer=True)
    out: list[tuple[str, bytes]] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                return out
            out.append((msg.subject, msg.data))
    finally:
        await sub.unsubscribe()


async def report(h: NeedleHandle, **extra: Any) -> str:
    body = {"grid": "wuxing-g1", "category": "road_damage", "title": TITLE, "description": DESCRIPTION,
            "location": POINT} | extra
    r = await h.client.post("/v1/issues", json=body, headers=h.auth(*GW1))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def test_free_text_is_sealed_in_the_stream_and_clear_to_readers(needle_factory: Any) -> None:
    h: NeedleHandle = await needle_factory()
    issue_id = await report(h)
    task = (await h.wait_for(f"/v1/issues/{issue_id}", h.auth(*ADMIN), lambda b: b["tasks"]))["tasks"][0]
    lead = next(t for t in (await h.client.get(f"/v1/issues/{issue_id}", headers=h.auth(*ADMIN))).json()["tasks"]
                if t["department"] == "dinghai-roads")
    r = await h.client.post(f"/v1/tasks/{lead['id']}/return", json={"reason": "Mr Li at No. 19 owns that drain"},
                            headers=h.auth(*ROADS))
    assert r.status_code == 200, r.text
    r = await h.client.post(f"/v1/issues/{issue_id}/comments", json={"text": "called Mrs Wang back"},
                            headers=h.auth(*GW1))
    assert r.status_code == 201, r.text
    assert r.json()["text"] == "called Mrs Wang back"  # the writer gets its own words back
    assert task["id"]

    # the stream: none of the words, sealed attributes instead, placeholders in data
    raws = await raw_events(h, issue_id)
    blob = b"".join(d for _, d in raws)
    for words in ("Mrs Wang", "Lane 4", "138 0013", "Mr Li", "30.0123456", "called Mrs"):
        assert words.encode() not in blob, words
    reported = orjson.loads(next(d for s, d in raws if s.endswith(".issue_reported")))
    assert reported["data"]["title"] == SEALED and reported["data"]["description"] == SEALED
    assert reported["data"]["location"] is None and reported["sealed"].count(".") == 2
    assert reported["data"]["grid"] == "wuxing-g1" and reported["data"]["category"] == "road_damage"
    dispatched = orjson.loads(next(d for s, d in raws if s.endswith(".task_dispatched")))
    assert "sealed" not in dispatched  # no free text, nothing sealed

    # the key: in the bucket, wrapped with the key-encryption key (the clear key is nowhere in the entry)
    kv = await h.stack.nc.jetstream().key_value(BUCKET)  # type: ignore[union-attr]
    entry = orjson.loads((await kv.get(PREFIX + issue_id)).value)
    assert set(entry) == {"key_id", "wrapped"}
    key = await h.stack.issue_keys.get(issue_id)  # type: ignore[union-attr]
    assert key is not None and base64.b64encode(key.key) not in (await kv.get(PREFIX + issue_id)).value

    # readers: the issue, its events, the read models and the audit see the words
    issue = (await h.client.get(f"/v1/issues/{issue_id}", headers=h.auth(*ADMIN))).json()
    assert issue["title"] == TITLE and issue["description"] == DESCRIPTION
    assert issue["location"] == POINT and issue["text_shredded_at"] is None
    evs = (await h.client.get(f"/v1/issues/{issue_id}/events", headers=h.auth(*ADMIN))).json()
    assert all("sealed" not in e for e in evs)
    assert next(e for e in evs if e["type"].endswith("task.returned.v1"))["data"]["reason"] == \
        "Mr Li at No. 19 owns that drain"
    listed = await h.wait_for("/v1/issues?status=dispatched,returned,reported", h.auth(*ADMIN),
                              lambda b: any(i["id"] == issue_id for i in b["items"]))
    assert next(i for i in listed["items"] if i["id"] == issue_id)["title"] == TITLE
    audit = (await h.client.get(f"/v1/issues/{issue_id}/audit", headers=h.auth(*ADMIN))).json()
    assert any(TITLE in a["summary"] for a in audit["items"])


async def test_retention_shreds_a_closed_issues_text_and_only_that(needle_factory: Any, tmp_path: Path) -> None:
    h: NeedleHandle = await needle_factory(rules=rules_with_retention(tmp_path, "PT2S"), retention_sweep_s=0.3)
    closed = await report(h, resolved_on_site=True)  # 即报即处: closed at once
    still_open = await report(h)
    assert (await h.client.get(f"/v1/issues/{closed}", headers=h.auth(*ADMIN))).json()["status"] == "closed"
    kv = await h.stack.nc.jetstream().key_value(BUCKET)  # type: ignore[union-attr]
    key_rev = (await kv.get(PREFIX + closed)).revision

    issue = await h.wait_for(f"/v1/issues/{closed}", h.auth(*ADMIN), lambda b: b["text_shredded_at"], timeout=20)
    assert issue["title"] == ERASED and issue["description"] == ERASED and issue["location"] is None
    assert issue["status"] == "closed" and issue["category"] == "road_damage" and issue["grid"] == "wuxing-g1"
    evs = (await h.client.get(f"/v1/issues/{closed}/events", headers=h.auth(*ADMIN))).json()
    shreds = [e for e in evs if e["type"] == "needle.issue.text_shredded.v1"]
    assert len(shreds) == 1 and shreds[0]["data"]["reason"] == "retention" and shreds[0]["actor"] == "needle/retention"
    assert next(e for e in evs if e["type"].endswith("issue.reported.v1"))["data"]["title"] == ERASED

    # the key: its message erased on disk (not only purged), the entry gone
    with pytest.raises(KeyNotFoundError):
        await kv.get(PREFIX + closed)
    got = orjson.loads((await h.stack.nc.request(  # type: ignore[union-attr]
        f"$JS.API.STREAM.MSG.GET.{KV_STREAM}", orjson.dumps({"seq": key_rev}), timeout=5)).data)
    assert got.get("error", {}).get("code") == 404, got

    # read models and audit: erased; the open issue keeps its words
    listed = await h.wait_for("/v1/issues", h.auth(*ADMIN), lambda b: any(
        i["id"] == closed and i["title"] == ERASED for i in b["items"]))
    assert next(i for i in listed["items"] if i["id"] == still_open)["title"] == TITLE
    audit = (await h.client.get(f"/v1/issues/{closed}/audit", headers=h.auth(*ADMIN))).json()["items"]
    assert not any(TITLE in a["summary"] for a in audit) and any(ERASED in a["summary"] for a in audit)
    opened = (await h.client.get(f"/v1/issues/{still_open}", headers=h.auth(*ADMIN))).json()
    assert opened["title"] == TITLE and opened["text_shredded_at"] is None

    # the sweeper comes again and again: still one shred; an open issue is refused by the decider
    await asyncio.sleep(1.0)
    evs = (await h.client.get(f"/v1/issues/{closed}/events", headers=h.auth(*ADMIN))).json()
    assert len([e for e in evs if e["type"] == "needle.issue.text_shredded.v1"]) == 1
    with pytest.raises(Conflict):
        await shred_issue(h.stack.store, h.stack.issue_keys, still_open, by="t",  # type: ignore[arg-type]
                          reason="retention", retention=None, now=issue_now())
    assert (await h.stack.issue_keys.get(still_open)) is not None  # type: ignore[union-attr]

    # text written after the shred is sealed with a new key (made over the purged entry): it reads clear, the
    # shredded text stays erased
    r = await h.client.post(f"/v1/issues/{closed}/comments", json={"text": "written after the shred"},
                            headers=h.auth(*GW1))
    assert r.status_code == 201, r.text
    new_key = await h.stack.issue_keys.get(closed)  # type: ignore[union-attr]
    assert new_key is not None and new_key.key_id != shreds[0]["data"]["key_id"]
    evs = (await h.client.get(f"/v1/issues/{closed}/events", headers=h.auth(*ADMIN))).json()
    assert evs[-1]["data"]["text"] == "written after the shred"
    assert next(e for e in evs if e["type"].endswith("issue.reported.v1"))["data"]["title"] == ERASED

    # a rebuild from the stream agrees: erased where shredded, clear elsewhere
    rm = h.stack.read_models
    assert rm is not None
    await rebuild(rm.pool, h.stack.nc.jetstream(), ProjectionWriter(h.stack.org, h.stack.rulebook.tz),  # type: ignore
                  texts=h.stack.issue_keys)
    rows = {r["id"]: r for r in await rm.pool.fetch("SELECT id, title, lat, text_shredded_at FROM issues")}
    assert rows[closed]["title"] == ERASED and rows[closed]["lat"] is None and rows[closed]["text_shredded_at"]
    assert rows[still_open]["title"] == TITLE and rows[still_open]["lat"] == POINT["lat"]


def issue_now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def test_a_key_destroyed_in_one_process_is_dropped_at_once_by_the_others(needle_factory: Any) -> None:
    import secrets as _secrets

    from shared.privacy.issuekeys import IssueKeys

    h: NeedleHandle = await needle_factory(services=("intake",))
    nc = h.stack.nc
    assert nc is not None
    kek = _secrets.token_bytes(32)
    a, b = IssueKeys(nc, kek=kek), IssueKeys(nc, kek=kek)  # two processes' caches (TTL 30 s)
    await a.start()
    await b.start()
    try:
        made = await a.get_or_create("01jnfe38800000000000000abc", new_issue=True)
        seen = await b.get("01jnfe38800000000000000abc")  # now cached in b
        assert seen is not None and seen.key == made.key
        assert await a.destroy("01jnfe38800000000000000abc")
        for _ in range(50):  # the notice, not the 30 s TTL
            if await b.get("01jnfe38800000000000000abc") is None:
                break
            await asyncio.sleep(0.02)
        assert await b.get("01jnfe38800000000000000abc") is None
    finally:
        await a.close()
        await b.close()
