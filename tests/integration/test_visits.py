"""组团式服务 on real servers: household visits recorded idempotently, 入户率 counting each household once,
the grid's own people only, reports linked to their visit both ways, coverage equal to a recount from the
raw stream, campaigns counted in households, and no household key in clear anywhere in the stored stream."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.config import load_org
from shared.domain import visits as dv
from shared.events import subjects as sj
from shared.events.codec import decode
from shared.events.models import IssueClosed, IssueReported, TaskDispatched, TaskResolved, VisitRecorded
from tests.support import NeedleHandle

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ORG = FIXTURES / "visits_org.yaml"
RULES = FIXTURES / "contract_rules.yaml"
G1, G2, T1 = "wuxing-g1", "wuxing-g2", "tanfeng-g1"


def gw(h: NeedleHandle, grid: str) -> dict[str, str]:
    return h.auth("grid_worker", f"area:{grid}")


async def visit(h: NeedleHandle, headers: dict[str, str], grid: str, household: str, key: str | None = None,
                status: int = 201, **extra: Any) -> dict[str, Any]:
    r = await h.client.post("/v1/visits", headers=headers | ({"Idempotency-Key": key} if key else {}),
                            json={"grid": grid, "household": household, **extra})
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    body["_seq"] = r.headers.get("Needle-Seq")
    body["_replayed"] = r.headers.get("Idempotent-Replayed")
    return body


async def coverage(h: NeedleHandle, area: str, seq: int, **params: str) -> dict[str, Any]:
    r = await h.client.get("/v1/visits/coverage", params={"area": area, **params},
                           headers=h.auth("admin") | {"Needle-Min-Seq": str(seq)})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def last_seq(h: NeedleHandle) -> int:
    assert h.stack.nc is not None
    return int((await h.stack.nc.jetstream().stream_info(sj.EVENTS_STREAM)).state.last_seq)


async def raw_stream(h: NeedleHandle) -> list[tuple[str, bytes]]:
    """Every stored message of the event stream: (subject, bytes as stored)."""
    assert h.stack.nc is not None
    js = h.stack.nc.jetstream()
    out = []
    for seq in range(1, await last_seq(h) + 1):
        m = await js.get_msg(sj.EVENTS_STREAM, seq)
        out.append((m.subject, m.data or b""))
    return out


async def test_visits_are_idempotent_and_a_household_counts_once(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES)
    first = await visit(h, gw(h, G1), G1, "3-201", key="k1", note="家中老人独居")
    again = await visit(h, gw(h, G1), G1, "3-201", key="k1", note="家中老人独居")
    assert again["id"] == first["id"] and again["_replayed"] == "true" and first["_replayed"] is None
    await visit(h, gw(h, G1), G1, "3-201", key="k1", note="another body", status=409)
    # the same door, spelt differently, on another day's visit; a second household; the team's handler
    second = await visit(h, gw(h, G1), G1, " 3-201 ", key="k2", kind="follow_up")
    assert second["id"] != first["id"] and second["household"] == first["household"]
    team = await visit(h, h.auth("handler", "dept:wuxing-g1-team"), G1, "3-202")
    assert team["household"] != first["household"] and team["by"] == "handler:dept:wuxing-g1-team"
    cov = await coverage(h, "wuxing", int(team["_seq"]))
    g1 = next(g for g in cov["grids"] if g["grid"] == G1)
    assert (g1["households"], g1["visited"], g1["visits"], g1["rate"]) == (4, 2, 3, 0.5)
    assert cov["total"]["households"] == 7 and cov["total"]["visited"] == 2
    assert [b["grid"] for b in cov["below_target"]] == [G2, G1]  # 0/3 then 2/4, both under 0.9
    r = await h.client.get("/v1/visits", params={"grid": G1}, headers=gw(h, G1) | {"Needle-Min-Seq": team["_seq"]})
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    assert "3-201" not in r.text


async def test_only_the_grids_own_people_record_and_read(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES)
    await visit(h, gw(h, G2), G1, "1-101", status=403)  # another grid's worker
    await visit(h, h.auth("handler", "dept:wuxing-committee"), G1, "1-101", status=403)  # not the grid's team
    await visit(h, h.auth("handler", "dept:wuxing-team"), G1, "1-101", status=403)  # a community's team
    await visit(h, h.auth("handler", "dept:wuxing-g1-team"), G2, "1-101", status=403)  # another grid's team
    await visit(h, h.auth("handler", "dept:wuxing-g1-doctors"), G1, "1-101")  # the grid's second team
    await visit(h, h.auth("supervisor", "area:wuxing"), G1, "1-101", status=403)
    await visit(h, gw(h, "wuxing"), "wuxing", "1-101", status=422)  # a community is not a grid
    await visit(h, gw(h, G1), G1, "1-101", kind="campaign", status=422)  # a campaign visit names its campaign
    v = await visit(h, gw(h, G1), G1, "1-101")
    readers = ((gw(h, G2), 403), (h.auth("supervisor", "area:tanfeng"), 403),
               (h.auth("supervisor", "area:wuxing"), 200), (h.auth("handler", "dept:wuxing-g1-team"), 200))
    for headers, status in readers:
        r = await h.client.get("/v1/visits", params={"grid": G1}, headers=headers | {"Needle-Min-Seq": v["_seq"]})
        assert r.status_code == status, (headers, r.text)
        r = await h.client.get(f"/v1/visits/{v['id']}", headers=headers | {"Needle-Min-Seq": v["_seq"]})
        assert r.status_code == status, (headers, r.text)


async def test_a_report_and_its_visit_link_both_ways(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES)
    v = await visit(h, gw(h, G1), G1, "5-501", note="楼道堆物")
    r = await h.client.post("/v1/issues", headers=gw(h, G1), json={
        "grid": G1, "category": "neighbour_dispute", "title": "楼道堆物纠纷", "visit": v["id"]})
    assert r.status_code == 201, r.text
    issue_id = r.json()["id"]
    r = await h.client.get(f"/v1/issues/{issue_id}", headers=h.auth("admin"))
    assert r.json()["visit"] == v["id"]  # the report names its visit
    got = await h.client.get(f"/v1/visits/{v['id']}", headers=gw(h, G1) | {"Needle-Min-Seq": r.headers["Needle-Seq"]})
    assert got.status_code == 200 and got.json()["issues"] == [issue_id]  # the visit lists the issue
    # a later follow-up visit names the issue it came back about
    fu = await visit(h, gw(h, G1), G1, "5-501", kind="follow_up", issues=[issue_id])
    assert fu["issues"] == [issue_id]
    # a visit of another grid, or none at all, cannot be named; nor can another grid's issue
    other = await visit(h, gw(h, G2), G2, "1-1")
    for bad in (other["id"], "v0000000000000000000000000"):
        r = await h.client.post("/v1/issues", headers=gw(h, G1), json={
            "grid": G1, "category": "neighbour_dispute", "title": "x", "visit": bad})
        assert r.status_code == 422 and r.json()["field"] == "visit", r.text
    await visit(h, gw(h, G2), G2, "1-1", issues=[issue_id], status=422)


async def test_coverage_equals_a_recount_and_no_household_key_is_stored(
        needle_factory: Callable[..., Any], nats_factory: Callable[..., Any]) -> None:
    nats = nats_factory()
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES, nats_url=nats.url)
    doors = {G1: ["门牌ZQ-0417", "门牌ZQ-0418", "门牌ZQ-0419", "门牌ZQ-0417"], G2: ["门牌WX-2-0001"],
             T1: ["门牌TF-0007", "门牌TF-0008"]}
    raised = []
    for grid, keys in doors.items():
        for i, key in enumerate(keys):
            v = await visit(h, gw(h, grid), grid, key, note=f"走访 {i}")
            if i == 0:  # each grid's first visit raises a report; G1's is resolved on the spot
                r = await h.client.post("/v1/issues", headers=gw(h, grid), json={
                    "grid": grid, "category": "neighbour_dispute", "title": f"{grid} 走访发现", "visit": v["id"]})
                assert r.status_code == 201, r.text
                raised.append((grid, r.json()["id"]))
    g1_issue = raised[0][1]  # the community committee resolves G1's
    issue = await h.wait_for(f"/v1/issues/{g1_issue}", h.auth("admin"), lambda b: b["tasks"])
    task, committee = issue["tasks"][0]["id"], h.auth("handler", "dept:wuxing-committee")
    for step, body in (("acknowledge", None), ("resolve", {"note": "当场调解"})):
        r = await h.client.post(f"/v1/tasks/{task}/{step}", headers=committee, json=body)
        assert r.status_code == 200, r.text
    seq = await last_seq(h)

    # the recount: straight from the raw events, with the pure fold
    stored = await raw_stream(h)
    envs = [decode(data, i + 1) for i, (_, data) in enumerate(stored)]
    visits = {e.subject: e.data for e in envs if isinstance(e.data, VisitRecorded)}
    named: dict[str, list[str]] = {vid: list(v.issues) for vid, v in visits.items()}
    for e in envs:
        if isinstance(e.data, IssueReported) and e.data.visit:
            named[e.data.visit].append(e.subject)
    leads = {e.data.task_id for e in envs if isinstance(e.data, TaskDispatched) and e.data.role == "lead"}
    resolved = {e.subject for e in envs if isinstance(e.data, IssueClosed)
                or (isinstance(e.data, TaskResolved) and e.data.task_id in leads)}
    counts = dv.recount(((v, named[vid]) for vid, v in visits.items()), resolved)
    assert counts[G1] == {"visited": 3, "visits": 4, "issues_raised": 1, "issues_resolved": 1}
    expected = dv.coverage_rows(load_org(ORG), "huannan", counts, 0.9)
    got = await coverage(h, "huannan", seq)
    for key in ("total", "areas", "grids", "below_target"):
        assert got[key] == expected[key], key
    assert {a["id"]: a["rate"] for a in got["areas"]} == {"huannan": round(6 / 9, 4), "wuxing": round(4 / 7, 4),
                                                          "tanfeng": 1.0}
    # a window that holds none of the visits counts nothing
    empty = await coverage(h, "huannan", seq, to="2020-01-01T00:00:00Z")
    assert empty["total"]["visits"] == 0

    # no household key in clear: not in any stored message, nor anywhere in JetStream's files on disk
    clear = {k.encode() for keys in doors.values() for k in keys}
    assert all(k not in data for _, data in stored for k in clear)
    assert any(b"\xe8\xb5\xb0\xe8\xae\xbf" in data for _, data in stored)  # the notes ("走访"): it sees text
    files = [p for p in Path(nats.data_dir).rglob("*") if p.is_file()]
    blob = b"".join(p.read_bytes() for p in files)
    assert b"\xe8\xb5\xb0\xe8\xae\xbf" in blob  # the scan reads the stored blocks (uncompressed, unencrypted)
    assert not [k for k in clear if k in blob]


async def test_campaign_counted_in_households(needle_factory: Callable[..., Any]) -> None:
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES)
    sup = h.auth("supervisor", "area:huannan")
    r = await h.client.post("/v1/campaigns", headers=sup, json={
        "area": "wuxing", "category": "neighbour_dispute", "title": "婴幼儿排查",
        "households": {G1: 3, G2: 2}})
    assert r.status_code == 202, r.text
    cid = r.json()["id"]
    assert r.json()["households_target"] == 5
    bad = await h.client.post("/v1/campaigns", headers=sup, json={
        "area": "wuxing", "category": "neighbour_dispute", "title": "x", "households": {T1: 1}})
    assert bad.status_code == 422 and bad.json()["field"] == f"households.{T1}"
    for grid, doors in ((G1, ["1", "2", "3", "3"]), (G2, ["9"])):
        for d in doors:
            v = await visit(h, gw(h, grid), grid, d, kind="campaign", campaign=cid)
    await visit(h, gw(h, G1), G1, "4")  # a routine visit does not count towards the campaign
    await visit(h, gw(h, T1), T1, "1", kind="campaign", campaign=cid, status=422)  # no campaign issue there
    await h.client.get("/v1/visits", headers=h.auth("admin") | {"Needle-Min-Seq": v["_seq"]})
    r = await h.client.get(f"/v1/campaigns/{cid}", params={"area": "wuxing"}, headers=sup)
    assert r.status_code == 200, r.text
    hh = r.json()["households"]
    assert (hh["target"], hh["reached"], hh["rate"]) == (5, 4, 0.8)
    assert {g["grid"]: (g["reached"], g["target"]) for g in hh["grids"]} == {G1: (3, 3), G2: (1, 2)}
    assert hh["lagging"] == [G2]
    # "all": every household the org declares
    r = await h.client.post("/v1/campaigns", headers=sup, json={
        "area": "tanfeng", "category": "neighbour_dispute", "title": "全覆盖走访", "households": "all"})
    assert r.status_code == 202 and r.json()["households_target"] == 2, r.text
    # a campaign without households is the one-issue-per-grid campaign it always was
    r = await h.client.post("/v1/campaigns", headers=sup, json={
        "area": "wuxing", "category": "neighbour_dispute", "title": "plain"})
    r = await h.client.get(f"/v1/campaigns/{r.json()['id']}", params={"area": "wuxing"}, headers=sup)
    assert r.status_code == 200 and r.json()["households"] is None and r.json()["issues"] == 2


async def test_a_rebuild_gives_the_same_visits_and_coverage(needle_factory: Callable[..., Any]) -> None:
    """Exactly once, as the other read models: a rebuild from the stream (spilling past 2 issues, so a report
    naming a visit may find it only in Postgres) ends with the very rows the live worker wrote."""
    from services.projections.rebuild import rebuild

    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES)
    for grid in (G1, G2, T1):
        for door in ("a", "b", "a"):
            v = await visit(h, gw(h, grid), grid, door)
        r = await h.client.post("/v1/issues", headers=gw(h, grid), json={
            "grid": grid, "category": "neighbour_dispute", "title": "走访发现", "visit": v["id"]})
        assert r.status_code == 201, r.text
    seq = await last_seq(h)
    before = await coverage(h, "city", seq)
    worker = h.stack.projection_worker
    assert await worker.wait_for(await last_seq(h), 20)
    pool = h.stack.read_models.pool
    rows = [tuple(r) for r in await pool.fetch("SELECT * FROM visits ORDER BY id")]
    assert len(rows) == 9 and sum(len(r["issues"]) for r in await pool.fetch("SELECT issues FROM visits")) == 3
    assert h.stack.nc is not None
    report = await rebuild(pool, h.stack.nc.jetstream(), worker.writer, max_issues=2, read_batch=5)
    assert report["spills"] >= 1, report
    assert [tuple(r) for r in await pool.fetch("SELECT * FROM visits ORDER BY id")] == rows
    after = await coverage(h, "city", seq)
    assert {k: after[k] for k in ("total", "areas", "grids")} == {k: before[k] for k in ("total", "areas", "grids")}
