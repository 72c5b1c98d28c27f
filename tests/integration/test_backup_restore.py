"""Backup and restore round trip on real servers: a needle with data is snapshotted stream by stream
(JetStream's snapshot API), restored into a fresh nats-server, its read models rebuilt into a fresh
database; the restored needle has the same events at the same sequences, answers /v1/issues and
/v1/stats the same, and its SLA timers still fire."""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from services.ops import backup as bk
from shared.config import load_org, load_rulebook
from shared.events import subjects as sj
from shared.privacy.issuekeys import issue_keys_for
from shared.store import snapshots as snap
from tests.support import NeedleHandle, ensure_database, events, report, restored_kek

FIXTURES = Path(__file__).parents[1] / "fixtures"
ORG, RULES = FIXTURES / "contract_org.yaml", FIXTURES / "fast_rules.yaml"
SUP = ("supervisor", "area:city")


async def _stop_router(h: NeedleHandle) -> None:
    """Nothing appends after this (the intake is idle): the views read next are the backup's."""
    for task in [t for t in h.stack.life.tasks if t.get_name() in ("router", "router-timers")]:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _views(h: NeedleHandle, ids: list[str]) -> dict[str, Any]:
    sup = h.auth(*SUP)
    issues = (await h.client.get("/v1/issues?limit=100", headers=sup)).json()
    stats = (await h.client.get("/v1/stats?area=city", headers=sup)).json()
    return {"issues": issues, "stats": stats, "events": {i: await events(h, i) for i in ids}}


async def _caught_up(h: NeedleHandle) -> int:
    last = int((await h.stack.nc.jetstream().stream_info(sj.EVENTS_STREAM)).state.last_seq)  # type: ignore[union-attr]
    for _ in range(400):
        if h.stack.projection_worker.seq >= last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError("projections did not catch up")


async def test_round_trip_keeps_events_views_and_timers(needle_factory: Callable[..., Any], nats_factory: Any,
                                                        pg_url: str, tmp_path: Path) -> None:
    a: NeedleHandle = await needle_factory(ORG, RULES)
    ids = [await report(a, "pothole"), await report(a, "streetlight_outage"), await report(a, "noise_complaint")]
    hw = a.auth("handler", "dept:wuxing-committee")
    await a.wait_for("/v1/tasks?status=dispatched", hw, lambda b: len(b["items"]) >= 2)
    task = next(t for t in (await a.client.get("/v1/tasks?status=dispatched", headers=hw)).json()["items"]
                if t["issue_id"] == ids[2])
    assert (await a.client.post(f"/v1/tasks/{task['id']}/acknowledge", headers=hw)).status_code == 200
    await a.wait_for("/v1/issues?limit=100", a.auth(*SUP),
                     lambda b: sum(i["status"] in ("dispatched", "in_progress") for i in b["items"]) == 3)
    await _stop_router(a)
    last_seq = await _caught_up(a)
    before = await _views(a, ids)

    target = tmp_path / "backup"
    seen: dict[str, int] = {}

    def announce(name: str, total: int) -> Callable[[int], None]:
        seen[name] = 0
        return lambda n: seen.__setitem__(name, seen[name] + n)

    assert a.stack.nc is not None
    manifest = await bk.backup(a.stack.nc, target, announce=announce)
    with pytest.raises(bk.BackupError, match="already holds a backup"):
        await bk.backup(a.stack.nc, target)
    await a.close()
    names = [s["name"] for s in manifest["streams"]]
    assert names[:2] == [sj.EVENTS_STREAM, sj.TIMERS_STREAM] and "KV_NEEDLE_WEBHOOKS" in names
    on_disk = json.loads((target / bk.MANIFEST).read_text())
    events_entry = on_disk["streams"][0]
    assert events_entry["state"]["last_seq"] == last_seq and events_entry["state"]["first_seq"] == 1
    assert seen[sj.EVENTS_STREAM] == events_entry["size"] > 0

    # a fresh nats-server and database: restore, then rebuild the read models
    fresh = nats_factory()
    nc = await nats.connect(fresh.url)
    try:
        await bk.restore(nc, target)
        info = await snap.stream_info(nc, sj.EVENTS_STREAM)
        assert info is not None and info["state"]["last_seq"] == last_seq
        with pytest.raises(bk.BackupError, match="refusing to overwrite"):
            await bk.restore(nc, target)
        db_url = await ensure_database(pg_url, f"needle_restore_{id(nc)}")
        rb = load_rulebook(RULES)
        # the key-encryption key is kept apart from the backup and restored with it (docs/SECURITY.md)
        texts = await issue_keys_for(nc, a.stack.settings)
        figures = await bk.rebuild_read_models(nc, db_url, load_org(ORG), rb.tz, texts=texts)
        assert figures["target_seq"] == last_seq
    finally:
        await nc.close()

    restored_kek(fresh.url, a.stack.settings.data_dir)
    b: NeedleHandle = await needle_factory(ORG, RULES, nats_url=fresh.url, database=db_url.rsplit("/", 1)[1],
                                           services=("intake", "projections"))
    after = await _views(b, ids)
    assert after["events"] == before["events"]  # same ids, types, data and sequence numbers
    assert after["issues"] == before["issues"]
    assert after["stats"] == before["stats"]

    # the router picks up where the backup was taken: the streetlight's 8 s acknowledge clock still runs
    await b.stack.start_router()
    for _ in range(600):
        evs = await events(b, ids[1])
        late = [e for e in evs if e["type"].startswith("needle.sla.") and e["sequence"] > last_seq]
        if late:
            break
        await asyncio.sleep(0.05)
    assert late, f"no SLA timer fired after the restore: {[e['type'] for e in evs]}"


def test_a_damaged_backup_is_refused(tmp_path: Path) -> None:
    (tmp_path / "NEEDLE_EVENTS.tar.s2").write_bytes(b"not the snapshot")
    (tmp_path / bk.MANIFEST).write_text(json.dumps({"format": bk.FORMAT, "streams": [
        {"name": "NEEDLE_EVENTS", "file": "NEEDLE_EVENTS.tar.s2", "size": 16, "sha256": "0" * 64, "config": {},
         "state": {}}]}))
    with pytest.raises(bk.BackupError, match="sha256"):
        bk.read_manifest(tmp_path)
    (tmp_path / bk.MANIFEST).write_text(json.dumps({"format": "other/9", "streams": []}))
    with pytest.raises(bk.BackupError, match="unknown format"):
        bk.read_manifest(tmp_path)


async def test_a_snapshot_larger_than_the_flow_control_window_round_trips(nats_factory: Any, tmp_path: Path) -> None:
    """~10 MB of incompressible messages: many chunks, acks past the server's window, the end marker of
    a long snapshot (nats-server 2.15 sends it with status 204), then a byte-exact restore."""
    import os

    src, dst = nats_factory(), nats_factory()
    nc, nc2 = await nats.connect(src.url), await nats.connect(dst.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="NEEDLE_BIG", subjects=["big.>"])
        n, futs = 30_000, []
        for i in range(n):
            futs.append(await js.publish_async(f"big.{i % 100}", os.urandom(300)))
            if len(futs) >= 1000:
                await asyncio.gather(*futs)
                futs = []
        await asyncio.gather(*futs)
        chunks: list[int] = []
        with open(tmp_path / "big.tar.s2", "wb") as out:
            s = await snap.snapshot(nc, "NEEDLE_BIG", out, consumers=False, progress=chunks.append)
        assert s.state["messages"] == n and s.bytes > 9_000_000 and len(chunks) > 60
        with open(tmp_path / "big.tar.s2", "rb") as src_file:
            info = await snap.restore(nc2, s.config, s.state, src_file)
        assert info["state"]["messages"] == n and info["state"]["last_seq"] == n
        a = await nc.jetstream().get_msg("NEEDLE_BIG", seq=n // 2)
        b = await nc2.jetstream().get_msg("NEEDLE_BIG", seq=n // 2)
        assert (a.subject, a.data) == (b.subject, b.data)
    finally:
        await nc.close()
        await nc2.close()


async def test_restore_destroys_again_the_keys_of_residents_the_events_say_were_forgotten(
        nats_factory: Any, tmp_path: Path) -> None:
    """A forget records resident_forgotten, then destroys the key; a backup cut in between holds both.
    The restored needle must not hold a key its own events say is gone. Without the keys (opt-out) the
    backup holds no KV_NEEDLE_RESIDENT_KEYS at all."""
    from shared.privacy.keystore import ResidentKeys
    from shared.store.streams import ensure_streams

    src, dst = nats_factory(), nats_factory()
    nc, nc2 = await nats.connect(src.url), await nats.connect(dst.url)
    try:
        await ensure_streams(nc)
        keys = ResidentKeys(nc)
        await keys.start(watch=False)
        kept, forgotten = await keys.key_for_id("res_kept"), await keys.key_for_id("res_gone")
        await nc.request(sj.resident_event("res_gone", "resident_forgotten"), b"{}", timeout=5)  # key not yet destroyed
        # as needle records it now: the subject names an HMAC of the id, the data the id (a register number here)
        hukou = await keys.key_for_id("hukou-110101")
        await nc.request(sj.resident_event(await keys.subject_token("hukou-110101"), "resident_forgotten"),
                         orjson.dumps({"data": {"resident_id": "hukou-110101"}}), timeout=5)

        bare = await bk.backup(nc, tmp_path / "no-keys", resident_keys=False)
        assert bk.KEYS_STREAM not in [s["name"] for s in bare["streams"]]
        manifest = await bk.backup(nc, tmp_path / "bk")
        assert bk.KEYS_STREAM in [s["name"] for s in manifest["streams"]]

        restored = await bk.restore(nc2, tmp_path / "bk")
        assert restored["forgotten_again"] == 2
        after = ResidentKeys(nc2)
        await after.start(watch=False)
        assert (await after.find("res_gone"))[1] is None and (await after.find("hukou-110101"))[1] is None
        assert hukou.key != kept.key
        got = (await after.find("res_kept"))[1]
        assert got is not None and got.key == kept.key and forgotten.key != kept.key
    finally:
        await nc.close()
        await nc2.close()
