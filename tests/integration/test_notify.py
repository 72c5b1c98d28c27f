"""Notifications on a real stack (NATS + Postgres): given a local HTTP receiver as the notify endpoint and an
org whose roads bureau has a duty contact, the dispatch reaches the contact, the resolution reaches the resident
(their phone, with the 回访 link); the receiver, deduping by notification id, sees each exactly once across a
notifier that refused deliveries (503: not acked, sent again) and across restarts (events made while no notifier
ran are sent when it is back); the event stream holds neither the resident's phone nor the duty contact."""
from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from services.entrypoints.processes import free_port
from tests.integration.test_residents import stream_payloads, unique_mobile
from tests.support import NeedleHandle, start_needle

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CONTACT = "+8613900000077"
GW = ("grid_worker", "area:wuxing-g1")
ROADS = ("handler", "dept:dinghai-roads")


class Receiver:
    """A gateway stand-in: records every POST; answers 503 to the first ``refuse`` of them."""

    def __init__(self, refuse: int = 0) -> None:
        self.raw: list[dict[str, Any]] = []
        self.refuse = refuse
        self.port = free_port()
        self.server: uvicorn.Server | None = None
        self.task: asyncio.Task[Any] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        status = 204
        if self.refuse > 0:
            self.refuse -= 1
            status = 503
        else:
            self.raw.append(orjson.loads(body))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/notify"

    @property
    def unique(self) -> dict[str, dict[str, Any]]:
        return {n["id"]: n for n in self.raw}  # the receiver's dedupe, by notification id

    async def start(self) -> None:
        self.server = uvicorn.Server(uvicorn.Config(self, host="127.0.0.1", port=self.port, log_level="warning"))
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self.task = asyncio.create_task(self.server.serve())
        for _ in range(500):
            if self.server.started:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the receiver did not start")

    async def stop(self) -> None:
        assert self.server is not None and self.task is not None
        self.server.should_exit = True
        await self.task

    async def wait(self, predicate: Callable[[dict[str, dict[str, Any]]], bool], timeout: float = 20) -> None:
        for _ in range(int(timeout / 0.05)):
            if predicate(self.unique):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the receiver never got there: {list(self.unique)}")


def org_with_contact(tmp_path: Path) -> Path:
    text = (FIXTURES / "contract_org.yaml").read_text()
    line = "{id: dinghai-roads, name: 定海区交通运输局, kind: transport, area: dinghai}"
    assert line in text
    path = tmp_path / "org.yaml"
    path.write_text(text.replace(line, line[:-1] + f', contact: "{CONTACT}"}}'))
    return path


async def report(h: NeedleHandle, phone: str) -> str:
    r = await h.client.post("/v1/issues", headers=h.auth(*GW), json={
        "grid": "wuxing-g1", "category": "road_damage", "title": f"pothole {uuid.uuid4().hex[:6]}",
        "resident": {"name": "李四", "phone": phone}})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def lead_of(h: NeedleHandle, issue_id: str) -> str:
    body = await h.wait_for(f"/v1/issues/{issue_id}", h.auth("admin"), lambda b: bool(b["tasks"]))
    return str(next(t["id"] for t in body["tasks"] if t["role"] == "lead"))


async def test_notifications_reach_the_receiver_exactly_once_across_restarts_and_no_personal_data_is_streamed(
        nats_factory: Callable[[], Any], pg_url: str, tmp_path: Path) -> None:
    receiver = Receiver(refuse=2)  # the first two deliveries fail: the events stay unacked and come again
    await receiver.start()
    org = org_with_contact(tmp_path)
    nats_url = nats_factory().url
    db = f"needle_notify_{uuid.uuid4().hex[:8]}"
    typed, e164 = unique_mobile()
    handles: list[NeedleHandle] = []

    async def needle(**settings: Any) -> NeedleHandle:  # one data dir throughout: a restart of one needle
        h = await start_needle(tmp_path / "needle", org=org, rules=FIXTURES / "contract_rules.yaml",
                               nats_url=nats_url, pg_admin_url=pg_url, database=db, **settings)
        handles.append(h)
        return h

    async def stop(h: NeedleHandle) -> None:
        handles.remove(h)
        await h.close()

    try:
        h1: NeedleHandle = await needle(notify_url=receiver.url)
        assert h1.stack.notifier is not None
        one = await report(h1, typed)
        lead = await lead_of(h1, one)
        assert (await h1.client.post(f"/v1/tasks/{lead}/acknowledge", headers=h1.auth(*ROADS))).status_code == 200
        r = await h1.client.post(f"/v1/tasks/{lead}/resolve", json={"note": "done"}, headers=h1.auth(*ROADS))
        assert r.status_code == 200, r.text
        await receiver.wait(lambda u: any(n["kind"] == "resolution" and n["issue"] == one for n in u.values()))
        await stop(h1)

        # no notifier runs (no notify URL): a second issue is dispatched meanwhile
        h2: NeedleHandle = await needle()
        assert h2.stack.notifier is None
        two = await report(h2, typed)
        await lead_of(h2, two)
        await stop(h2)
        assert not any(n["issue"] == two for n in receiver.raw)

        # the notifier is back: it resumes at its durable consumer's acks
        h3: NeedleHandle = await needle(notify_url=receiver.url)
        await receiver.wait(lambda u: any(n["kind"] == "dispatch" and n["issue"] == two for n in u.values()))
        await asyncio.sleep(1.0)  # anything sent twice would show by now

        unique = receiver.unique
        kinds = Counter((n["issue"], n["kind"]) for n in unique.values())
        assert kinds == {(one, "dispatch"): 1, (one, "resolution"): 1, (two, "dispatch"): 1}, kinds
        dupes = [i for i, c in Counter(n["id"] for n in receiver.raw).items() if c > 1]
        assert dupes == [], dupes  # after the acks nothing was sent again (the refused ones were never received)
        dispatch = next(n for n in unique.values() if n["kind"] == "dispatch" and n["issue"] == one)
        assert dispatch["to"] == CONTACT and dispatch["recipient"] == "department:dinghai-roads"
        assert "定海区交通运输局" in dispatch["text"] and dispatch["language"] == "zh"
        resolution = next(n for n in unique.values() if n["kind"] == "resolution")
        assert resolution["to"] == e164 and resolution["recipient"].startswith("resident:")
        assert "/f/" + one + "/" in resolution["link"] and resolution["link"] in resolution["text"]
        assert "李四" not in resolution["text"]
        # the stream holds no personal data: neither the resident's phone nor the duty contact
        payloads = b"\n".join(await stream_payloads(h3))
        for secret in (e164, e164[3:], CONTACT, "李四"):
            assert secret.encode() not in payloads, secret
    finally:
        for h in handles:
            with contextlib.suppress(Exception):
                await h.close()
        await receiver.stop()
