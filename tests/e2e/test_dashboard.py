"""The supervisors' dashboard in a real browser: headless Chromium (Playwright) against a whole needle stack.

Seeds Putuo (普陀区) issues over HTTP (one closed, one reworked, one in progress, one left overdue by a
2-second acknowledge clock), opens ``/dashboard?area=putuo#token=...``, checks the numbers it shows against
``/v1/stats`` and ``/v1/overdue``, then reports one more issue over the API and waits for the page to update by
itself (no reload). Saves ``artifacts/dashboard.png``. Skipped when /usr/bin/chromium is missing (CI installs
it with ``apt-get install -y chromium``); Playwright is driven with that binary, never ``playwright install``.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from shared.config import load_org
from tests.support import NeedleHandle

ROOT = Path(__file__).resolve().parents[2]
ORG = ROOT / "deploy" / "org" / "zhoushan.yaml"
RULES = ROOT / "tests" / "fixtures" / "dashboard_rules.yaml"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="needs /usr/bin/chromium (apt-get install -y chromium); CI installs it")


class Seeder:
    def __init__(self, h: NeedleHandle) -> None:
        self.h = h
        self.sup = h.auth("supervisor", "area:putuo")
        self.last_seq = 0

    async def report(self, grid: str, category: str, title: str) -> str:
        r = await self.h.client.post("/v1/issues", json={"grid": grid, "category": category, "title": title},
                                     headers=self.h.auth("grid_worker", f"area:{grid}"))
        assert r.status_code == 201, r.text
        self.last_seq = int(r.headers["Needle-Seq"])
        return str(r.json()["id"])

    async def visit(self, grid: str, household: str) -> None:
        r = await self.h.client.post("/v1/visits", json={"grid": grid, "household": household},
                                     headers=self.h.auth("grid_worker", f"area:{grid}"))
        assert r.status_code == 201, r.text
        self.last_seq = int(r.headers["Needle-Seq"])

    async def lead(self, issue_id: str) -> dict[str, Any]:
        body = await self.h.wait_for(f"/v1/issues/{issue_id}", self.sup,
                                     lambda b: any(t["role"] == "lead" and t["status"] == "dispatched"
                                                   for t in b["tasks"]))
        return next(t for t in body["tasks"] if t["role"] == "lead" and t["status"] == "dispatched")

    async def task(self, task: dict[str, Any], action: str, body: dict[str, Any] | None = None) -> None:
        r = await self.h.client.post(f"/v1/tasks/{task['id']}/{action}", json=body,
                                     headers=self.h.auth("handler", f"dept:{task['department']}"))
        assert r.status_code == 200, r.text

    async def worker(self, issue_id: str, grid: str, action: str, body: dict[str, Any]) -> None:
        r = await self.h.client.post(f"/v1/issues/{issue_id}/{action}", json=body,
                                     headers=self.h.auth("grid_worker", f"area:{grid}"))
        assert r.status_code == 200, r.text


async def seed(h: NeedleHandle) -> str:
    """Four Putuo issues; returns the id of the one left overdue."""
    s = Seeder(h)
    closed = await s.report("zhanmao-g31", "road_damage", "展茅路面坑槽")
    reworked = await s.report("haibin-g1", "road_damage", "海滨路井盖缺失")
    open_ = await s.report("zhanmao-g34", "neighbour_dispute", "楼上漏水邻里纠纷")
    overdue = await s.report("zhanmao-g35", "illegal_parking", "违停堵塞消防通道")
    for issue, grid, passed in ((closed, "zhanmao-g31", True), (reworked, "haibin-g1", False)):
        t = await s.lead(issue)
        await s.task(t, "acknowledge")
        await s.task(t, "resolve", {"note": "已处理"})
        await s.worker(issue, grid, "verify", {"passed": passed})
    await s.worker(closed, "zhanmao-g31", "feedback", {"satisfaction": "satisfied"})
    await s.task(await s.lead(open_), "acknowledge")
    await s.lead(overdue)  # dispatched to 展茅派出所, never acknowledged: overdue after 2 s
    await h.wait_for("/v1/overdue?area=putuo", s.sup, lambda b: any(i["id"] == overdue for i in b["items"]),
                     timeout=20)
    await h.wait_for("/v1/stats?area=putuo", s.sup, lambda b: b["overall"]["counts"].get("closed") == 1
                     and b["overall"]["counts"].get("reopened") == 1)
    for door in ("1-101", "1-102", "1-103", "1-101"):  # 第31网格's team: three households, one of them twice
        await s.visit("zhanmao-g31", door)
    await h.wait_for("/v1/visits/coverage?area=putuo", s.sup | {"Needle-Min-Seq": str(s.last_seq)},
                     lambda b: b["total"]["visits"] == 4)
    return overdue


def pct(value: float | None) -> str:
    if value is None:
        return "—"
    p = value * 100
    return f"{p:.0f}%" if float(p).is_integer() else f"{p:.1f}%"


@needs_chromium
async def test_dashboard_shows_rates_and_updates_live(needle_factory: Callable[..., Any]) -> None:
    async_api = pytest.importorskip("playwright.async_api", reason="pip install playwright (test extra)")
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES)
    overdue_id = await seed(h)
    sup = h.auth("supervisor", "area:putuo")
    stats = (await h.client.get("/v1/stats?area=putuo", headers=sup)).json()
    reported = stats["overall"]["counts"]["reported"]
    assert reported == 4

    shell = await h.client.get("/dashboard")
    assert shell.status_code == 200 and "千条线穿进一根针" in shell.text
    assert "script-src 'self'" in shell.headers["content-security-policy"]
    assert (await h.client.get("/dashboard/stream?area=putuo&access_token=nope")).status_code == 401
    worker_token = h.token("grid_worker", "area:zhanmao-g31")
    assert (await h.client.get(f"/dashboard/stream?access_token={worker_token}")).status_code == 403

    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900}, locale="zh-CN")
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            await page.goto(f"{h.base_url}/dashboard?area=putuo#token={h.token('supervisor', 'area:putuo')}")
            await page.wait_for_selector("#live[data-state=live]", timeout=15_000)
            await page.wait_for_function("() => Number(document.body.dataset.loaded || 0) >= 1", timeout=15_000)
            assert "#token" not in page.url  # the token leaves the address bar at once

            # the seeded numbers, as the API computes them
            assert await page.text_content("#count-reported .count-value") == str(reported)
            for rate in ("response_rate", "resolution_rate", "satisfaction_rate", "on_time_close_rate", "rework_rate"):
                want = pct(stats["overall"]["rates"][rate]["value"])
                assert await page.text_content(f"#kpi-{rate} .kpi-value") == want, rate
            assert await page.text_content("#kpi-rework_rate .kpi-value") == "50%"  # 1 reopened of 2 verified
            assert await page.text_content("#kpi-satisfaction_rate .kpi-value") == "100%"
            # 入户率 beside the rates, and the grids below the rulebook's target listed
            cov = (await h.client.get("/v1/visits/coverage?area=putuo", headers=sup)).json()
            assert cov["total"]["visited"] == 3 and cov["total"]["visits"] == 4
            assert await page.text_content("#kpi-coverage_rate .kpi-value") == pct(cov["total"]["rate"])
            assert await page.text_content("#count-visits .count-value") == "4"
            below = page.locator("#below-table tr[data-grid='zhanmao-g31']")
            assert pct(3 / load_org(ORG).areas["zhanmao-g31"].households) in (await below.text_content() or "")
            assert await page.locator("#below-table tbody tr").count() == len(cov["below_target"])
            # 考核: this month's ranking of the departments, the rules version and the monthly 通报's links
            await page.wait_for_function("() => document.body.dataset.scores !== undefined", timeout=15_000)
            month = (await page.input_value("#scores-month"))
            scores = (await h.client.get(f"/v1/scores?period={month}&by=department&area=putuo", headers=sup)).json()
            assert await page.text_content("#scores-rules") == scores["rules_version"]
            ranked = [r for r in scores["items"] if r["score"] is not None]
            assert await page.locator("#scores-dept tr").count() == 1 + len(ranked)
            if ranked:
                assert ranked[0]["name"] in (await page.locator("#scores-dept tr").nth(1).text_content() or "")
            assert await page.locator("#scores-trend tr th").count() == 1 + 6  # the unit, then six months
            assert await page.get_attribute("#report-xlsx", "data-format") == "xlsx"
            row = page.locator(f"#overdue-table tr[data-issue='{overdue_id}']")
            await row.wait_for()
            assert "违停堵塞消防通道" in (await row.text_content() or "")
            assert "展茅派出所" in (await row.text_content() or "")  # who holds it
            assert "响应时限" in (await row.text_content() or "")  # which clock
            assert await page.locator("#areas-table tr[data-area='zhanmao']").count() == 1
            assert await page.locator("#dept-table tr[data-dept='zhanmao-police']").count() == 1
            assert await page.locator("#chart-rates").is_visible()

            # live: a new report over the API changes the page without a reload
            await page.evaluate("window.__sameDocument = true")
            await Seeder(h).report("zhanmao-g32", "road_damage", "路灯旁路面塌陷")
            await async_api.expect(page.locator("#count-reported .count-value")).to_have_text(
                str(reported + 1), timeout=15_000)
            assert await page.evaluate("window.__sameDocument === true")
            zhanmao = page.locator("#areas-table tr[data-area='zhanmao'] td:nth-child(2)")
            assert (await zhanmao.text_content() or "").strip() == "4"  # g31, g34, g35 and the new g32
            await Seeder(h).visit("zhanmao-g32", "2-201")  # a visit nudges the page too
            await async_api.expect(page.locator("#count-visits .count-value")).to_have_text("5", timeout=15_000)

            # language toggle: English labels, then back to 中文 for the screenshot
            await page.click("#lang-toggle")
            assert await page.evaluate("document.body.classList.contains('lang-en')")
            assert await page.locator("#kpi-response_rate .kpi-label .en").is_visible()
            await page.screenshot(path=str(ARTIFACTS / "dashboard-en.png"), full_page=True)
            await page.click("#lang-toggle")
            await asyncio.sleep(1.8)  # let the change highlight fade before the picture
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # drill down into 展茅街道 without leaving the page
            await page.click("#areas-table tr[data-area='zhanmao'] a.drill")
            await page.wait_for_function("() => location.search === '?area=zhanmao'")
            await page.wait_for_selector("#areas-table tr[data-area='dazhan']")
            await page.wait_for_selector("#live[data-state=live]")
            assert await page.evaluate("window.__sameDocument === true")

            # a tab without a token asks for one (sessionStorage is per tab)
            bare = await browser.new_page()
            await bare.goto(f"{h.base_url}/dashboard")
            await bare.wait_for_selector("#login", state="visible")
            assert await bare.locator("#main").is_hidden()
        finally:
            await browser.close()
    assert not problems, problems


async def _next_event(lines: AsyncIterator[str]) -> tuple[str, dict[str, Any]]:
    """The next named SSE event (comments such as ``: ping`` skipped)."""
    name, data = "", ""
    async for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
        elif line == "":
            if name:
                return name, json.loads(data)
            name, data = "", ""
    raise AssertionError("the stream ended")


async def test_stream_nudges_only_for_its_area(needle_factory: Callable[..., Any]) -> None:
    """No browser needed: a supervisor of 展茅街道 is nudged by a 展茅 report, not by one in 沈家门."""
    h: NeedleHandle = await needle_factory(org=ORG, rules=RULES)
    s = Seeder(h)
    token = h.token("supervisor", "area:zhanmao")
    async with h.client.stream("GET", f"/dashboard/stream?area=zhanmao&access_token={token}") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.aiter_lines()
        async with asyncio.timeout(10):
            assert (await _next_event(lines))[0] == "hello"
        elsewhere = await s.report("haibin-g1", "road_damage", "沈家门的事项")
        await h.wait_for("/v1/issues?area=shenjiamen", s.sup,
                         lambda b: any(i["id"] == elsewhere and i["status"] == "dispatched" for i in b["items"]))
        await asyncio.sleep(0.5)  # the stream has seen that commit and stayed quiet
        await s.report("zhanmao-g31", "road_damage", "展茅的事项")
        async with asyncio.timeout(10):
            name, data = await _next_event(lines)
        assert name == "changed" and data["area"] == "zhanmao"
        assert data["seq"] >= s.last_seq  # not an earlier nudge for 沈家门


@needs_chromium
async def test_another_city_shows_its_kind_names_and_configuration_gaps(needle_factory: Callable[..., Any]) -> None:
    """The invented 清河市 (tests/fixtures/anycity_*.yaml): its kinds' display names beside the departments,
    and the kinds its rulebook names that nothing serves under 东城区 in the configuration-gaps panel."""
    async_api = pytest.importorskip("playwright.async_api", reason="pip install playwright (test extra)")
    fixtures = ROOT / "tests" / "fixtures"
    h: NeedleHandle = await needle_factory(org=fixtures / "anycity_org.yaml", rules=fixtures / "anycity_rules.yaml")
    r = await h.client.post("/v1/issues", headers=h.auth("grid_worker", "area:liuzhuang-g1"),
                            json={"grid": "liuzhuang-g1", "category": "garbage_overflow", "title": "垃圾桶满溢"})
    assert r.status_code == 201, r.text
    sup = h.auth("supervisor", "area:dongcheng")
    await h.wait_for("/v1/stats?area=dongcheng", sup, lambda b: b["departments"].get(
        "dongcheng-sanitation", {}).get("counts", {}).get("tasks_dispatched"))
    problems: list[str] = []
    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900}, locale="zh-CN")
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            await page.goto(f"{h.base_url}/dashboard?area=dongcheng#token={h.token('supervisor', 'area:dongcheng')}")
            await page.wait_for_function("() => Number(document.body.dataset.loaded || 0) >= 1", timeout=15_000)
            dept = page.locator("#dept-table tr[data-dept='dongcheng-sanitation'] td:first-child")
            assert "东城区环卫所" in (await dept.text_content() or "") and "环卫" in (await dept.text_content() or "")
            assert await page.locator("#gaps-panel").is_visible()
            gap = page.locator("#gaps-table tr[data-gap='garbage_overflow.street.landscaping']")
            text = await gap.text_content() or ""
            assert "垃圾满溢" in text and "园林 (landscaping)" in text and "柳庄镇" in text and "河西街道" in text
            assert await page.locator("#gaps-table tr[data-gap^='accessibility.street.disabled']").count() == 0
        finally:
            await browser.close()
    assert not problems, problems
