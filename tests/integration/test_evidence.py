"""Evidence on real servers: photos uploaded to the JetStream Object Store and referenced by reports,
resolves and verifications; the rulebook's evidence rules; who may read a photo; the grid found from a
location by boundary (POST /v1/issues and Open311); a report resolved on the spot (即报即处)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from services.media.store import BUCKET
from tests.photos import jpeg_with_gps, noise_png, png_bytes
from tests.support import NeedleHandle, events, issue, restored_kek

FIXTURES = Path(__file__).parents[1] / "fixtures"
ORG, RULES = FIXTURES / "evidence_org.yaml", FIXTURES / "evidence_rules.yaml"
G1, G2 = ("grid_worker", "area:wuxing-g1"), ("grid_worker", "area:wuxing-g2")
COMMITTEE = ("handler", "dept:wuxing-committee")
LIMIT = 8 * 1024
INSIDE_G1, INSIDE_G2 = {"lat": 30.002, "lon": 122.1015}, {"lat": 30.002, "lon": 122.1045}


@pytest.fixture
async def h(needle_factory: Callable[..., Any]) -> NeedleHandle:
    handle: NeedleHandle = await needle_factory(ORG, RULES, media_max_bytes=LIMIT)
    return handle


async def upload(h: NeedleHandle, data: bytes, content_type: str = "image/png", who: tuple[str, str] = G1
                 ) -> httpx.Response:
    return await h.client.post("/v1/media", content=data, headers=h.auth(*who) | {"Content-Type": content_type})


async def uploaded(h: NeedleHandle, data: bytes, content_type: str = "image/png") -> str:
    r = await upload(h, data, content_type)
    assert r.status_code == 201, r.text
    media_id: str = r.json()["id"]
    return media_id


def problem(r: httpx.Response, status: int, field: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["field"] == field, body
    return body


async def stored_objects(h: NeedleHandle) -> int:
    assert h.stack.nc is not None
    try:
        info = await h.stack.nc.jetstream().stream_info(f"OBJ_{BUCKET}")
    except Exception:
        return 0
    return int(info.state.messages)


async def test_before_and_after_photos_through_report_resolve_and_verify(h: NeedleHandle) -> None:
    photo = png_bytes()
    r = await upload(h, photo)
    assert r.status_code == 201, r.text
    before = r.json()
    assert before["content_type"] == "image/png" and before["bytes"] == len(photo)
    assert (before["width"], before["height"]) == (48, 32) and before["id"] == before["sha256"]
    again = await upload(h, photo)  # content-addressed: the same photo is the same medium
    assert again.status_code == 201 and again.json() == before

    report = {"grid": "wuxing-g1", "category": "litter", "title": "垃圾堆在路口"}
    refused = problem(await h.client.post("/v1/issues", json=report, headers=h.auth(*G1)), 422, "media")
    assert refused["rule"] == "categories.litter.evidence.report"
    r = await h.client.post("/v1/issues", headers=h.auth(*G1),
                            json=report | {"media": [{"id": before["id"], "phase": "before"}]})
    assert r.status_code == 201, r.text
    issue_id = r.json()["id"]
    body = await h.wait_for(f"/v1/issues/{issue_id}", h.auth("admin"), lambda b: len(b["tasks"]) == 1)
    task = body["tasks"][0]["id"]

    hw = h.auth(*COMMITTEE)
    refused = problem(await h.client.post(f"/v1/tasks/{task}/resolve", json={"note": "cleared"}, headers=hw),
                      422, "media")
    assert refused["rule"] == "categories.litter.evidence.resolve"
    other = problem(await h.client.post(f"/v1/tasks/{task}/resolve", headers=hw, json={
        "note": "cleared", "media": [{"id": before["id"], "phase": "other"}]}), 422, "media")
    assert other["rule"] == "categories.litter.evidence.resolve"  # the photo must be an after-photo
    unknown = "0" * 64
    problem(await h.client.post(f"/v1/tasks/{task}/resolve", headers=hw, json={
        "note": "cleared", "media": [{"id": unknown, "phase": "after"}]}), 422, "media.0.id")
    after = await uploaded(h, png_bytes(color=(40, 200, 40)))
    r = await h.client.post(f"/v1/tasks/{task}/resolve", headers=hw,
                            json={"note": "cleared", "media": [{"id": after, "phase": "after"}]})
    assert r.status_code == 200, r.text
    r = await h.client.post(f"/v1/issues/{issue_id}/verify", headers=h.auth(*G1),
                            json={"passed": True, "media": [{"id": after, "phase": "other"}]})
    assert r.status_code == 200, r.text

    got = await issue(h, issue_id)
    assert [(m["id"], m["phase"], m["stage"]) for m in got["media"]] == [
        (before["id"], "before", "report"), (after, "after", "resolve"), (after, "other", "verify")]
    assert got["media"][1]["task_id"] == task and got["status"] == "closed"
    evs = await events(h, issue_id)
    resolved = next(e for e in evs if e["type"] == "needle.task.resolved.v1")
    assert resolved["data"]["media"] == [{"id": after, "phase": "after"}]  # references only, never bytes

    # read back: the reporter's grid and the handler may; a grid worker of another grid may not
    r = await h.client.get(f"/v1/media/{before['id']}", headers=h.auth(*G1))
    assert r.status_code == 200 and r.content == photo and r.headers["content-type"] == "image/png"
    r = await h.client.get(f"/v1/media/{after}", params={"size": "thumb"}, headers=hw)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:3] == b"\xff\xd8\xff"
    r = await h.client.get(f"/v1/media/{before['id']}", headers=h.auth(*G2))
    assert r.status_code == 403, r.text
    assert (await h.client.get(f"/v1/media/{before['id']}", headers=h.auth("handler", "dept:dinghai-roads"))
            ).status_code == 403
    lonely = await uploaded(h, png_bytes(color=(1, 2, 3)))  # referenced by no issue: only an admin
    assert (await h.client.get(f"/v1/media/{lonely}", headers=h.auth(*G1))).status_code == 403
    assert (await h.client.get(f"/v1/media/{lonely}", headers=h.auth("admin"))).status_code == 200


async def test_the_type_comes_from_the_bytes_and_the_size_is_limited(h: NeedleHandle) -> None:
    problem(await upload(h, png_bytes(), "image/jpeg"), 415, "Content-Type")  # a PNG sent as JPEG
    problem(await upload(h, b"GIF89a" + b"\0" * 40, "image/png"), 415, "Content-Type")
    problem(await upload(h, b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png"), 422, "body")  # not a real PNG
    problem(await upload(h, png_bytes(), "text/plain"), 415, "Content-Type")
    assert (await upload(h, png_bytes(), who=("integrator", ""))).status_code == 403

    before = await stored_objects(h)
    big = noise_png(64)
    assert len(big) > LIMIT
    problem(await upload(h, big), 413, "body")

    async def chunks() -> Any:  # no Content-Length: counted while it streams
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    r = await h.client.post("/v1/media", content=chunks(), headers=h.auth(*G1) | {"Content-Type": "image/png"})
    problem(r, 413, "body")
    assert await stored_objects(h) == before  # nothing stored
    assert not list((h.stack.settings.data_dir / "tmp").glob("*"))  # and no temporary file left


async def test_a_photo_may_come_as_a_multipart_form(h: NeedleHandle) -> None:
    photo = png_bytes(color=(12, 34, 56))
    r = await h.client.post("/v1/media", headers=h.auth(*G1), data={"caption": "路口"},
                            files={"file": ("p.png", photo, "image/png")})
    assert r.status_code == 201, r.text
    assert r.json()["bytes"] == len(photo) and r.json()["id"] == (await upload(h, photo)).json()["id"]
    problem(await h.client.post("/v1/media", headers=h.auth(*G1), files={"file": ("p.jpg", photo, "image/jpeg")}),
            415, "Content-Type")
    problem(await h.client.post("/v1/media", headers=h.auth(*G1), files={"other": ("a.png", photo, "image/png"),
                                                                          "file": ("b.png", photo, "image/png")}),
            422, "file")
    problem(await h.client.post("/v1/media", headers=h.auth(*G1), data={"caption": "no photo"},
                                files={"x": (None, b"text")}), 422, "file")
    problem(await h.client.post("/v1/media", headers=h.auth(*G1), files={"file": ("n.png", noise_png(64),
                                                                                  "image/png")}), 413, "body")


async def test_the_exif_location_is_stripped_and_the_rest_kept(h: NeedleHandle) -> None:
    import io

    media_id = await uploaded(h, jpeg_with_gps(), "image/jpeg")
    r = await h.client.post("/v1/issues", headers=h.auth(*G1), json={
        "grid": "wuxing-g1", "category": "road_damage", "title": "pothole",
        "media": [{"id": media_id, "phase": "before"}]})
    assert r.status_code == 201, r.text
    got = await h.client.get(f"/v1/media/{media_id}", headers=h.auth(*G1))
    assert got.status_code == 200
    exif = Image.open(io.BytesIO(got.content)).getexif()
    assert 0x8825 not in exif and exif.get(0x010F) == "needle-test-camera"
    import hashlib

    assert hashlib.sha256(got.content).hexdigest() == media_id  # the id addresses the bytes stored


async def test_the_grid_is_found_from_the_location(h: NeedleHandle) -> None:
    admin = h.auth("admin")

    async def post(body: dict[str, Any], who: tuple[str, str] = ("admin", "")) -> httpx.Response:
        return await h.client.post("/v1/issues", headers=h.auth(*who),
                                   json={"category": "road_damage", "title": "where"} | body)

    r = await post({"location": INSIDE_G2})
    assert r.status_code == 201, r.text
    assert (await issue(h, r.json()["id"]))["grid"] == "wuxing-g2"
    border = {"lat": 30.002, "lon": 122.103}  # on the shared border: the first grid by id, every time
    for _ in range(2):
        r = await post({"location": border})
        assert r.status_code == 201 and (await issue(h, r.json()["id"]))["grid"] == "wuxing-g1"
    near = {"lat": 30.002, "lon": 122.09985}  # ~14 m west of grid 1, within the 30 m tolerance
    r = await post({"location": near}, G1)
    assert r.status_code == 201 and (await issue(h, r.json()["id"]))["grid"] == "wuxing-g1"
    problem(await post({"location": {"lat": 30.05, "lon": 122.2}}), 422, "location")  # outside every grid
    problem(await post({}), 422, "grid")  # neither
    mismatch = problem(await post({"grid": "wuxing-g1", "location": INSIDE_G2}), 422, "location")
    assert mismatch["located"] == "wuxing-g2"
    r = await post({"grid": "wuxing-g2", "location": border}, G2)  # on its border: within the tolerance
    assert r.status_code == 201, r.text
    # a grid worker still reports into a grid of their scope only
    assert (await post({"location": INSIDE_G2}, G1)).status_code == 403
    assert admin


async def test_open311_lat_long_without_a_grid_lands_in_the_grid_that_holds_it(h: NeedleHandle) -> None:
    key = h.token("admin")
    form = {"api_key": key, "service_code": "road_damage", "description": "井盖缺失",
            "lat": str(INSIDE_G2["lat"]), "long": str(INSIDE_G2["lon"]),
            "media_url": "https://photos.example/p/1.jpg"}
    r = await h.client.post("/open311/v2/requests.json", data=form)
    assert r.status_code == 201, r.text
    issue_id = r.json()[0]["service_request_id"]
    got = await issue(h, issue_id)
    assert got["grid"] == "wuxing-g2" and got["media_url"] == "https://photos.example/p/1.jpg"
    r = await h.client.get(f"/open311/v2/requests/{issue_id}.json")
    assert r.status_code == 200 and r.json()[0]["media_url"] == "https://photos.example/p/1.jpg"
    r = await h.client.post("/open311/v2/requests.json", data=form | {"lat": "30.05", "long": "122.2"})
    assert r.status_code == 400, r.text
    assert r.json()[0]["code"] == 400 and "outside every grid" in r.json()[0]["description"]


async def test_a_report_resolved_on_the_spot_is_never_dispatched(h: NeedleHandle) -> None:
    before = await uploaded(h, png_bytes(color=(9, 9, 9)))
    after = await uploaded(h, png_bytes(color=(250, 250, 250)))
    report = {"grid": "wuxing-g1", "category": "litter", "title": "垃圾已清", "resolved_on_site": True,
              "note": "叫来保洁员当场清理"}
    refused = problem(await h.client.post("/v1/issues", headers=h.auth(*G1), json=report | {
        "media": [{"id": before, "phase": "before"}]}), 422, "media")
    assert refused["rule"] == "categories.litter.evidence.resolve"  # the after-photo is required
    r = await h.client.post("/v1/issues", headers=h.auth(*G1), json=report | {
        "media": [{"id": before, "phase": "before"}, {"id": after, "phase": "after"}]})
    assert r.status_code == 201, r.text
    issue_id = r.json()["id"]
    plain = await h.client.post("/v1/issues", headers=h.auth(*G1), json={
        "grid": "wuxing-g1", "category": "road_damage", "title": "dispatched as usual"})
    assert plain.status_code == 201
    # the router has reacted to the later report: it has long seen the earlier one
    await h.wait_for(f"/v1/issues/{plain.json()['id']}", h.auth("admin"), lambda b: len(b["tasks"]) >= 1)
    got = await issue(h, issue_id)
    assert got["status"] == "closed" and got["tasks"] == [] and got["level"] is None
    types = [e["type"] for e in await events(h, issue_id)]
    assert types == ["needle.issue.reported.v1", "needle.issue.resolved_on_site.v1", "needle.issue.closed.v1"]
    problem(await h.client.post("/v1/issues", headers=h.auth(*G1), json={
        "grid": "wuxing-g1", "category": "road_damage", "title": "t", "note": "n"}), 422, "note")


async def test_backup_and_restore_keep_the_photos(needle_factory: Callable[..., Any], nats_factory: Any,
                                                  tmp_path: Path) -> None:
    import nats

    from services.ops import backup as bk

    a: NeedleHandle = await needle_factory(ORG, RULES)
    photo = png_bytes(color=(77, 66, 55))
    media_id = await uploaded(a, photo)
    r = await a.client.post("/v1/issues", headers=a.auth(*G1), json={
        "grid": "wuxing-g1", "category": "litter", "title": "kept", "media": [{"id": media_id, "phase": "before"}]})
    assert r.status_code == 201, r.text
    issue_id = r.json()["id"]
    assert a.stack.nc is not None
    manifest = await bk.backup(a.stack.nc, tmp_path / "bk")
    names = [s["name"] for s in manifest["streams"]]
    assert f"OBJ_{BUCKET}" in names and "KV_NEEDLE_MEDIA_REFS" in names
    await a.close()

    fresh = nats_factory()
    nc = await nats.connect(fresh.url)
    try:
        await bk.restore(nc, tmp_path / "bk")
    finally:
        await nc.close()
    restored_kek(fresh.url, a.stack.settings.data_dir)  # kept apart from the backup, restored with it
    b: NeedleHandle = await needle_factory(ORG, RULES, nats_url=fresh.url, services=("intake",))
    got = await b.client.get(f"/v1/media/{media_id}", headers=b.auth(*G1))
    assert got.status_code == 200 and got.content == photo
    thumb = await b.client.get(f"/v1/media/{media_id}?size=thumb", headers=b.auth(*G1))
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
    assert (await b.client.get(f"/v1/media/{media_id}", headers=b.auth(*G2))).status_code == 403
    assert [m["id"] for m in (await issue(b, issue_id))["media"]] == [media_id]
