"""The resident's own 回访 and 考核 on a real stack (NATS + Postgres): given a resolved issue, the grid worker
reads its one-time link; the resident's page opens, the answer is recorded once as the resident's own event
(actor "resident", no personal data), then the link answers 410; an expired link 410; another issue's link 403.
``GET /v1/scores`` then ranks the month by the rulebook in force, counting the resident's answer."""
from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from openpyxl import load_workbook
from typer.testing import CliRunner

from services.entrypoints import cli
from shared.domain import followup
from tests.support import NeedleHandle, events, of_type

GW = ("grid_worker", "area:wuxing-g1")
GW_OTHER = ("grid_worker", "area:wuxing-g2")
SUP = ("supervisor", "area:dinghai")
ROADS = ("handler", "dept:dinghai-roads")


async def resolved_issue(h: NeedleHandle) -> str:
    r = await h.client.post("/v1/issues", headers=h.auth(*GW),
                            json={"grid": "wuxing-g1", "category": "road_damage", "title": "pothole 回访"})
    assert r.status_code == 201, r.text
    issue_id: str = r.json()["id"]
    body = await h.wait_for(f"/v1/issues/{issue_id}", h.auth("admin"), lambda b: bool(b["tasks"]))
    lead = next(t["id"] for t in body["tasks"] if t["role"] == "lead")
    assert (await h.client.post(f"/v1/tasks/{lead}/acknowledge", headers=h.auth(*ROADS))).status_code == 200
    r = await h.client.post(f"/v1/tasks/{lead}/resolve", json={"note": "filled"}, headers=h.auth(*ROADS))
    assert r.status_code == 200, r.text
    return issue_id


def path_of(url: str) -> str:
    return url[url.index("/f/"):]


async def test_the_residents_link_works_once_expires_and_is_403_for_another_issue(needle: NeedleHandle,
                                                                                  tmp_path: Path) -> None:
    h = needle
    a, b = await resolved_issue(h), await resolved_issue(h)
    r = await h.client.get(f"/v1/issues/{a}/followup", headers=h.auth(*GW_OTHER))
    assert r.status_code == 403, r.text  # a grid worker of another grid
    r = await h.client.get(f"/v1/issues/{a}/followup", headers=h.auth(*ROADS))
    assert r.status_code == 403, r.text  # handlers do not ask the resident
    r = await h.client.get(f"/v1/issues/{a}/followup", headers=h.auth(*GW))
    assert r.status_code == 200, r.text
    link = r.json()
    expires = datetime.fromisoformat(link["expires_at"].replace("Z", "+00:00"))
    assert timedelta(hours=71) < expires - datetime.now(UTC) <= timedelta(hours=72)
    again = (await h.client.get(f"/v1/issues/{a}/followup", headers=h.auth(*SUP))).json()
    assert again["url"] == link["url"]  # one link per issue
    link_b = (await h.client.get(f"/v1/issues/{b}/followup", headers=h.auth(*GW))).json()

    page = await h.client.get(path_of(link["url"]))
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "满意" in page.text and "http" not in page.text.split("<script>")[0].lower().replace("http-equiv", "")
    # a's token on b's path: not made for b
    token_a = path_of(link["url"]).rsplit("/", 1)[1]
    r = await h.client.post(f"/f/{b}/{token_a}", json={"solved": True, "satisfaction": "satisfied"})
    assert r.status_code == 403, r.text
    # an expired link of a (signed with the same key, an hour ago)
    key = (h.stack.settings.data_dir / followup.SECRET_FILE).read_bytes()
    old = followup.token(key, a, datetime.now(UTC) - timedelta(hours=1))
    r = await h.client.post(f"/f/{a}/{old}", json={"solved": True, "satisfaction": "satisfied"})
    assert r.status_code == 410, r.text
    # bad input names the field
    r = await h.client.post(path_of(link["url"]), json={"solved": True, "satisfaction": "so-so"})
    assert r.status_code == 422 and "satisfaction" in r.text
    # the answer, once
    r = await h.client.post(path_of(link["url"]), json={"solved": False, "satisfaction": "dissatisfied",
                                                        "comment": "还在漏水"})
    assert r.status_code == 201, r.text
    r = await h.client.post(path_of(link["url"]), json={"solved": True, "satisfaction": "satisfied"})
    assert r.status_code == 410, r.text
    assert (await h.client.get(path_of(link["url"]))).status_code == 410
    assert (await h.client.get(f"/v1/issues/{a}/followup", headers=h.auth(*GW))).status_code == 410
    recorded = of_type(await events(h, a), "needle.issue.resident_feedback_recorded.v1")
    assert len(recorded) == 1 and recorded[0]["actor"] == "resident"
    assert recorded[0]["data"] | {"at": None} == {"solved": False, "satisfaction": "dissatisfied",
                                                 "comment": "还在漏水", "at": None}
    # the grid worker's 回访 by phone stays possible, and is marked as such; the resident's answer counts
    r = await h.client.post(f"/v1/issues/{b}/feedback", json={"satisfaction": "satisfied"}, headers=h.auth(*GW))
    assert r.status_code == 200, r.text
    r = await h.client.post(f"/v1/issues/{a}/feedback", json={"satisfaction": "satisfied"}, headers=h.auth(*GW))
    assert r.status_code == 200, r.text
    assert (await h.client.post(path_of(link_b["url"]),
                                json={"solved": True, "satisfaction": "basically_satisfied"})).status_code == 201

    # 考核 of this month: roads led a (the resident: not solved, 不满意) and b (solved, 基本满意)
    period = datetime.now(UTC).astimezone(h.stack.rulebook.tz).strftime("%Y-%m")
    sup = h.auth(*SUP)

    def ready(body: dict[str, Any]) -> bool:
        roads = next((i for i in body["items"] if i["id"] == "dinghai-roads"), None)
        return roads is not None and roads["rates"]["satisfaction_rate"]["denominator"] == 2

    body = await h.wait_for(f"/v1/scores?period={period}&by=department", sup, ready)
    assert body["rules_version"] == h.stack.rulebook.version and body["period"] == period
    roads = next(i for i in body["items"] if i["id"] == "dinghai-roads")
    assert roads["rates"]["satisfaction_rate"] | {"points": 0} == {"value": 0.5, "numerator": 1, "denominator": 2,
                                                                   "weight": 35.0, "points": 0}
    assert roads["rates"]["resolution_rate"]["numerator"] == 1  # a: the resident says not solved
    assert roads["rates"]["response_rate"]["numerator"] == 2
    # 30 x 2/2 + 35 x 1/2 + 35 x 1/2, no deductions
    assert roads["score"] == 65.0 and roads["rank"] == 1 and roads["name"]
    areas = (await h.client.get(f"/v1/scores?period={period}&by=area", headers=sup)).json()
    assert [i["id"] for i in areas["items"]] == [c.id for c in h.stack.org.children("dinghai")] or areas["items"]
    r = await h.client.get(f"/v1/scores?period={period}&by=department", headers=h.auth(*GW))
    assert r.status_code == 403
    r = await h.client.get("/v1/scores?period=2026-13&by=department", headers=sup)
    assert r.status_code == 422 and "period" in r.text
    r = await h.client.get(f"/v1/scores?period={period}&by=department&months=3", headers=sup)
    assert r.status_code == 200 and len(r.json()["trend"]) == 3

    # the 通报 over HTTP (the dashboard links it) and from the CLI
    r = await h.client.get(f"/v1/reports/monthly?period={period}&area=dinghai&format=xlsx", headers=sup)
    assert r.status_code == 200, r.text
    wb = load_workbook(io.BytesIO(r.content))
    assert wb.sheetnames[:2] == ["概览 Summary", "部门排名 Departments"] and wb.sheetnames[-1] == "超期案件 Overdue"
    assert "街道排名 Street" in wb.sheetnames and "社区排名 Community" in wb.sheetnames
    page = await h.client.get(f"/v1/reports/monthly?period={period}&area=dinghai", headers=sup)
    assert page.status_code == 200 and h.stack.rulebook.version in page.text and "定海区交通运输局" in page.text
    assert (await h.client.get(f"/v1/reports/monthly?period={period}", headers=h.auth(*GW))).status_code == 403
    out = tmp_path / "tongbao"
    env = {"NEEDLE_NATS_URL": h.stack.settings.nats_url or "", "NEEDLE_DATABASE_URL": h.stack.settings.database_url
           or "", "NEEDLE_ORG": str(h.stack.settings.org), "NEEDLE_RULES": str(h.stack.settings.rules)}
    result = await asyncio.to_thread(
        CliRunner().invoke, cli.app, ["report", "monthly", "--period", period, "--area", "dinghai", "--out", str(out),
                                      "--data-dir", str(tmp_path / "cli-data")], env=env)
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"tongbao-dinghai-{period}.{x}" for x in ("csv", "html", "xlsx")]
    assert load_workbook(out / f"tongbao-dinghai-{period}.xlsx").sheetnames == wb.sheetnames
