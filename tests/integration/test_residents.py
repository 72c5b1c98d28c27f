"""Residents' personal data on a real stack (NATS + Postgres): sealed per resident with a key kept
outside the event stream, readable by the roles that may see residents, absent in clear from every
byte the servers write, and crypto-shredded by ``needle forget`` / ``DELETE /v1/residents/{id}``:
every read shows "[erased]", the key's bytes are gone from disk, the facts stay."""
from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared.events import subjects as sj
from shared.privacy import sealing
from tests.integration.test_event_stream import read
from tests.support import NeedleHandle

GW1 = ("grid_worker", "area:wuxing-g1")
GW2 = ("grid_worker", "area:wuxing-g2")
ROADS = ("handler", "dept:dinghai-roads")
SUP = ("supervisor", "area:dinghai")
INTEGRATOR = ("integrator", "")
ADMIN = ("admin", "")
ERASED = sealing.ERASED


def unique_mobile() -> tuple[str, str]:
    """A fresh Chinese mobile number as a person types it, and its E.164 form."""
    digits = "139" + str(uuid.uuid4().int)[:8]
    return f"{digits[:3]} {digits[3:7]} {digits[7:]}", f"+86{digits}"


async def report(h: NeedleHandle, resident: dict[str, Any] | None, title: str | None = None,
                 key: str | None = None) -> tuple[int, Any]:
    body: dict[str, Any] = {"grid": "wuxing-g1", "category": "road_damage", "title": title or f"pothole {uuid.uuid4()}"}
    if resident is not None:
        body["resident"] = resident
    headers = h.auth(*GW1) | ({"Idempotency-Key": key} if key else {})
    r = await h.client.post("/v1/issues", headers=headers, json=body)
    return r.status_code, r.json()


async def get_issue(h: NeedleHandle, issue_id: str, who: tuple[str, str]) -> dict[str, Any]:
    r = await h.client.get(f"/v1/issues/{issue_id}", headers=h.auth(*who))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def reported_resident(h: NeedleHandle, issue_id: str, who: tuple[str, str]) -> Any:
    r = await h.client.get(f"/v1/issues/{issue_id}/events", headers=h.auth(*who))
    assert r.status_code == 200, r.text
    return next(e for e in r.json() if e["type"] == "needle.issue.reported.v1")["data"]["resident"]


def disk_bytes(root: Path) -> bytes:
    """Every byte of every file under ``root`` (the nats-server store and needle's data dir)."""
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                out.append((Path(dirpath) / f).read_bytes())
            except OSError:
                pass
    return b"\n".join(out)


async def stream_payloads(h: NeedleHandle) -> list[bytes]:
    js = h.stack.nc.jetstream()  # type: ignore[union-attr]
    info = await js.stream_info(sj.EVENTS_STREAM)
    sub = await js.subscribe(sj.ALL_EVENTS, ordered_consumer=True)
    out = []
    try:
        while len(out) < info.state.messages:
            out.append((await sub.next_msg(timeout=5)).data)
    finally:
        await sub.unsubscribe()
    return out


async def wait_erased(h: NeedleHandle, issue_id: str, timeout: float = 10.0) -> dict[str, Any]:
    return await h.wait_for(f"/v1/issues/{issue_id}", h.auth(*GW1),  # type: ignore[no-any-return]
                            lambda b: b["resident"]["name"] == ERASED, timeout)


async def needle_forget(h: NeedleHandle, who: str) -> str:
    env = {**os.environ, "NEEDLE_NATS_URL": h.stack.urls.nats}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.entrypoints.cli", "forget", who, "--data-dir", str(h.stack.settings.data_dir),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (out, err)
    return out.decode()


async def test_resident_sealed_readable_then_forgotten_everywhere(needle_factory: Callable[..., Any],
                                                                  tmp_path: Path) -> None:
    h: NeedleHandle = await needle_factory()
    typed, e164 = unique_mobile()
    name = "张三" + uuid.uuid4().hex[:6]
    title = f"pothole {uuid.uuid4()}"
    status, body = await report(h, {"name": name, "phone": typed}, title=title)
    assert status == 201, body
    first = body["id"]
    status, body = await report(h, {"name": name, "phone": e164})  # the same phone, written otherwise
    assert status == 201, body
    second = body["id"]

    # readable by the roles that may see residents; one resident, one key for both reports
    gw = await get_issue(h, first, GW1)
    rid = gw["resident"]["id"]
    assert gw["resident"] == {"id": rid, "name": name, "phone": e164, "erased": False}
    assert (await get_issue(h, second, GW1))["resident"]["id"] == rid
    await h.wait_for(f"/v1/issues/{first}", h.auth(*ADMIN), lambda b: len(b["tasks"]) == 2)
    assert (await get_issue(h, first, ROADS))["resident"]["phone"] == e164  # handler of one of its tasks
    assert (await get_issue(h, first, SUP))["resident"]["name"] == name
    assert (await get_issue(h, first, INTEGRATOR))["resident"] == {"id": rid}  # integrators: the id only
    assert (await reported_resident(h, first, GW1))["name"] == name
    assert await reported_resident(h, first, INTEGRATOR) == {"id": rid}
    for who in (INTEGRATOR, SUP):  # the SSE push channel carries the id only, to integrators and supervisors
        got = await read(h, h.auth(*who), params={"types": "issue_reported"}, until=lambda evs: len(evs) >= 2)
        assert [orjson.loads(e.data)["data"]["resident"] for e in got] == [{"id": rid}, {"id": rid}]

    # no clear name or phone in the stream, nor in any file the servers wrote (nor the title: an issue's free
    # text is sealed with the issue's own key; the scan does see the category, which is clear)
    payloads = await stream_payloads(h)
    assert not any(title.encode() in p for p in payloads)
    assert any(b'"issue_reported"' in p or b"issue.reported" in p for p in payloads)
    digits = e164.removeprefix("+86").encode()
    for p in payloads:
        assert digits not in p and name.encode() not in p and name.encode("unicode_escape") not in p
    raw_reported = next(orjson.loads(p) for p in payloads if b"needle.issue.reported.v1" in p)
    assert set(raw_reported["data"]["resident"]) == {"id", "key_id", "ciphertext", "nonce"}
    assert raw_reported["data"]["title"] == "[sealed]" and raw_reported["sealed"]
    await asyncio.sleep(0.5)
    disk = disk_bytes(tmp_path)
    assert title.encode() not in disk  # NATS's files hold the issue's text sealed (Postgres, opened, is elsewhere)
    assert b"needle.issue.reported.v1" in disk  # the scan does read the stream's files
    assert digits not in disk and name.encode() not in disk
    # ... nor in the read models (they hold no personal data at all)
    await h.wait_for("/v1/issues?area=dinghai", h.auth(*SUP), lambda b: any(i["id"] == second for i in b["items"]))
    r = await h.client.get("/v1/issues?area=dinghai&format=csv", headers=h.auth(*SUP))
    assert r.status_code == 200 and title in r.text and name not in r.text and str(digits.decode()) not in r.text
    r = await h.client.get(f"/v1/issues/{first}/audit", headers=h.auth(*SUP))
    assert r.status_code == 200 and name not in r.text and digits.decode() not in r.text

    # the key is on disk (outside the event stream), wrapped with the key-encryption key kept in DIR/secrets,
    # until it is forgotten; the clear key is nowhere on disk
    assert h.stack.residents is not None
    key = await h.stack.residents.lookup(rid)
    assert key is not None
    key_b64 = sealing.b64(key.key).encode()
    entry = await h.stack.residents.kv.get(await h.stack.residents.entry_name(rid))
    wrapped = orjson.loads(entry.value)["wrapped"].encode()
    assert wrapped in disk_bytes(tmp_path) and key_b64 not in disk_bytes(tmp_path)
    assert not any(key_b64 in p or wrapped in p for p in payloads)

    out = await needle_forget(h, typed)  # by phone, from another process
    assert f"resident {rid} forgotten" in out, out
    for issue_id in (first, second):
        erased = await wait_erased(h, issue_id)
        assert erased["resident"] == {"id": rid, "name": ERASED, "phone": ERASED, "erased": True}
        assert erased["category"] == "road_damage" and len(erased["tasks"]) >= 1  # the facts stay
        assert (await reported_resident(h, issue_id, SUP))["phone"] == ERASED
        assert (await get_issue(h, issue_id, ROADS))["resident"]["name"] == ERASED
        assert await reported_resident(h, issue_id, INTEGRATOR) == {"id": rid}
    await asyncio.sleep(0.5)
    assert wrapped not in disk_bytes(tmp_path)  # erased, not only marked deleted
    assert key.key not in disk_bytes(tmp_path)

    # the stream recorded the forget, without personal data
    payloads = await stream_payloads(h)
    forgotten = [orjson.loads(p) for p in payloads if b"needle.resident.forgotten.v1" in p]
    assert len(forgotten) == 1
    assert forgotten[0]["subject"] == rid and forgotten[0]["data"]["resident_id"] == rid
    assert forgotten[0]["data"]["key_ids"] == [key.key_id]
    assert digits not in payloads[-1] and name.encode() not in payloads[-1]

    # forgetting again changes nothing and records nothing
    out = await needle_forget(h, rid)
    assert "nothing to do" in out
    assert len([p for p in await stream_payloads(h) if b"needle.resident.forgotten.v1" in p]) == 1

    # a new report of the same phone: a new resident with a new key, readable; the old ones stay erased
    status, body = await report(h, {"name": name, "phone": typed})
    assert status == 201
    again = await get_issue(h, body["id"], GW1)
    assert again["resident"]["id"] != rid and again["resident"]["phone"] == e164
    new_key = await h.stack.residents.lookup(again["resident"]["id"])
    assert new_key is not None and new_key.key != key.key
    assert (await get_issue(h, first, GW1))["resident"]["name"] == ERASED


async def test_delete_resident_api_and_caller_given_ids(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(services=("intake", "router"))
    rid = f"hukou-{uuid.uuid4().hex[:12]}"
    status, body = await report(h, {"id": rid, "name": "李四"})
    assert status == 201, body
    issue_id = body["id"]
    assert (await get_issue(h, issue_id, GW1))["resident"] == {"id": rid, "name": "李四", "phone": None,
                                                               "erased": False}
    for who in (GW1, SUP, INTEGRATOR, ROADS):  # admins only
        r = await h.client.delete(f"/v1/residents/{rid}", headers=h.auth(*who))
        assert r.status_code == 403, r.text
    r = await h.client.delete(f"/v1/residents/{rid}", headers=h.auth(*ADMIN))
    assert r.status_code == 204, r.text
    assert (await get_issue(h, issue_id, GW1))["resident"]["name"] == ERASED  # at once in this process
    r = await h.client.delete(f"/v1/residents/{rid}", headers=h.auth(*ADMIN))
    assert r.status_code == 204  # idempotent
    r = await h.client.delete("/v1/residents/not%20an%20id", headers=h.auth(*ADMIN))
    assert r.status_code == 422 and r.json()["field"] == "resident_id"

    # the same caller-given id reported again gets a new key; the old report stays erased
    status, body = await report(h, {"id": rid, "name": "李四"})
    assert status == 201
    assert (await get_issue(h, body["id"], GW1))["resident"]["name"] == "李四"
    assert (await get_issue(h, issue_id, GW1))["resident"]["name"] == ERASED


async def test_concurrent_first_reports_of_one_phone_share_one_key(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(services=("intake",))
    _, e164 = unique_mobile()
    results = await asyncio.gather(*(report(h, {"phone": e164}) for _ in range(6)))
    assert all(s == 201 for s, _ in results), results
    rids = {(await get_issue(h, b["id"], GW1))["resident"]["id"] for _, b in results}
    assert len(rids) == 1


async def test_resident_validation_and_idempotency(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(services=("intake",))
    for resident, field in (({"name": "王五", "phone": "12345"}, "resident.phone"),
                            ({"phone": "not a phone"}, "resident.phone"),
                            ({}, "resident"),
                            ({"name": "x" * 101}, "resident.name"),
                            ({"name": "a\x00b"}, "resident.name"),
                            ({"id": "no spaces please", "name": "王五"}, "resident.id"),
                            ({"name": "王五", "email": "w@x.cn"}, "resident.email")):
        status, body = await report(h, resident)
        assert status == 422, (resident, body)
        assert body["field"] == field, (resident, body)
        assert "12345" not in body["detail"]  # the problem names the field, never echoes the number

    typed, e164 = unique_mobile()
    key = f"k-{uuid.uuid4()}"
    s1, b1 = await report(h, {"name": "赵六", "phone": typed}, title="t", key=key)
    s2, b2 = await report(h, {"name": "赵六", "phone": e164}, title="t", key=key)  # same resident: a replay
    assert s1 == s2 == 201 and b1["id"] == b2["id"]
    _, other = unique_mobile()
    s3, b3 = await report(h, {"name": "赵六", "phone": other}, title="t", key=key)  # another resident: 409
    assert s3 == 409, b3


async def test_open311_requester_fields_become_the_sealed_resident(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(services=("intake",))
    typed, e164 = unique_mobile()
    params = {"api_key": h.token(*GW1), "service_code": "road_damage", "attribute[grid]": "wuxing-g1",
              "description": "pothole", "first_name": "小明", "last_name": "王", "phone": typed,
              "email": "xm@example.cn"}
    r = await h.client.post("/open311/v2/requests.json", data=params)
    assert r.status_code == 201, r.text
    issue_id = r.json()[0]["service_request_id"]
    issue = await get_issue(h, issue_id, GW1)
    assert issue["resident"]["name"] == "王小明" and issue["resident"]["phone"] == e164
    r = await h.client.get(f"/open311/v2/requests/{issue_id}.json")
    assert r.status_code == 200 and "王小明" not in r.text and e164 not in r.text
    assert b"xm@example.cn" not in b"".join(await stream_payloads(h))
    r = await h.client.post("/open311/v2/requests.json", data=params | {"phone": "123"})
    assert r.status_code == 400 and "phone" in r.json()[0]["description"], r.text


async def test_keys_out_of_reach_are_unavailable_not_a_crash(nats_factory: Callable[[], Any]) -> None:
    """Reading or sealing a resident while NATS is gone is a retryable Unavailable (503), never a 500."""
    import nats

    from shared.domain.errors import Unavailable
    from shared.privacy.keystore import ResidentKeys
    from shared.privacy.residents import seal_resident

    nc = await nats.connect(nats_factory().url, max_reconnect_attempts=0)
    keys = ResidentKeys(nc)
    await keys.start(watch=False)
    await nc.close()
    with pytest.raises(Unavailable):
        await keys.lookup("res_gone")
    with pytest.raises(Unavailable):
        await seal_resident(keys, resident_id=None, name="x", phone="+8613800138000")
