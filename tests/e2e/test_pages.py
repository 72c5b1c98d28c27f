"""The working pages (/app/) in a real browser: the 展茅 story driven through the pages only.

A grid worker of 第33网格 on a phone (390×844, geolocation granted) picks the place on the grid map, then reports
slope-works blasting with a photo and GPS; the command centre (a supervisor of 展茅街道) accepts it from its
queue; the street command centre's handler acknowledges it (after a refused return shows the server's
problem+json in words), reports progress in a comment and asks to suspend (缓办); the command centre approves
the suspension in its approvals queue; the handler resumes and resolves; the grid worker sees the comment,
verifies on the spot and records the resident's feedback. Each step's screenshot goes to ``artifacts/pages/``
(gitignored). Also: a clear page for the wrong role, the token gone from the address bar, every page no wider
than the phone (the supervisor dashboard too), /docs and /redoc drawn from local assets, and no console error.
Skipped without /usr/bin/chromium, as the dashboard's browser test.

The rulebook is the demo's with 施工扰民 held for 受理 (``intake: review``) and a photo required at report and
at resolve (``evidence``), so the story needs the command centre's accept and both photos.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_dashboard import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, needs_chromium
from tests.support import NeedleHandle

ROOT = Path(__file__).resolve().parents[2]
ORG = ROOT / "deploy" / "org" / "zhoushan.yaml"
RULES = ROOT / "deploy" / "rules" / "zhoushan.yaml"
SHOTS = ARTIFACTS / "pages"
PHONE = {"width": 390, "height": 844}
# a 1×1 PNG: the camera's picture (kept on the page until the media endpoint lands)
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
                       "AAAABJRU5ErkJggg==")
TITLE = "张家宕边坡爆破扰民"
DUPLICATE = "张家宕爆破震得窗户响"
COMMENT = "已约谈施工方，爆破改在白天 10:00-16:00，并提前公示"


async def fits(page: Any) -> None:
    """Nothing sideways off a phone's screen."""
    width = await page.evaluate("document.documentElement.scrollWidth")
    if width > PHONE["width"]:
        await page.screenshot(path=str(SHOTS / "too-wide.png"))
        wide = await page.evaluate("""() => Array.from(document.querySelectorAll('body *'))
            .filter((e) => e.getBoundingClientRect().right > innerWidth + 1 && e.offsetParent !== null)
            .slice(0, 8).map((e) => e.tagName + '#' + e.id + '.' + e.className + ' '
                             + Math.round(e.getBoundingClientRect().right))""")
        raise AssertionError(f"{page.url} is {width}px wide on a {PHONE['width']}px phone: {wide}")


@needs_chromium
async def test_zhanmao_story_through_the_pages(needle_factory: Callable[..., Any], tmp_path: Path) -> None:
    async_api = pytest.importorskip("playwright.async_api", reason="pip install playwright (test extra)")
    expect = async_api.expect
    head = "  construction_nuisance:\n    name: 施工扰民\n"
    text = RULES.read_text(encoding="utf-8")
    assert head in text
    story_rules = tmp_path / "rules.yaml"
    story_rules.write_text(text.replace(head, head + "    intake: review\n"
                                        "    evidence: {report: photo, resolve: photo}\n"), encoding="utf-8")
    h: NeedleHandle = await needle_factory(org=ORG, rules=story_rules)
    gw, handler, sup = ("grid_worker", "area:zhanmao-g33"), ("handler", "dept:zhanmao-center"), ("supervisor",
                                                                                                  "area:zhanmao")
    shell = await h.client.get("/app/")
    assert shell.status_code == 200 and "script-src 'self'" in shell.headers["content-security-policy"]
    SHOTS.mkdir(parents=True, exist_ok=True)
    photo = tmp_path / "scene.png"
    photo.write_bytes(PNG)
    errors: list[str] = []
    allowed: list[str] = []  # console errors a step provokes on purpose (the browser logs a refused fetch)

    def watch(page: Any) -> Any:
        def on_console(m: Any) -> None:
            if m.type != "error":
                return
            if allowed and any(a in m.text for a in allowed):
                return
            errors.append(f"{page.url}: {m.text}")
        page.on("console", on_console)
        page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
        page.on("requestfailed", lambda r: errors.append(f"{page.url}: {r.url} failed")
                if not r.url.startswith(h.base_url) else None)  # nothing leaves the server (offline)
        return page

    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            phone = await browser.new_context(viewport=PHONE, device_scale_factor=1, is_mobile=True, has_touch=True,
                                              locale="zh-CN", geolocation={"latitude": 30.035, "longitude": 122.2454},
                                              permissions=["geolocation"])
            desk = await browser.new_context(viewport={"width": 1280, "height": 860}, locale="zh-CN")

            # 1. the grid worker reports on the phone: category searched by its Chinese name, GPS, photo, risk
            w = watch(await phone.new_page())
            await w.goto(f"{h.base_url}/app/#token={h.token(*gw)}")
            await w.get_by_label("类别").fill("施工扰民 (construction_nuisance)")
            assert "#token" not in w.url and "token" not in w.url  # moved to sessionStorage at once
            await w.get_by_label("标题").fill(TITLE)
            await w.get_by_label("描述").fill("边坡工程爆破震动，居民扬言集体上访")
            await w.get_by_label("居民同意向公众公开此项").check()  # anonymous Open311 reads may show the description
            # a tap on the grid map (GET /v1/map: the boundaries in the worker's scope) picks a place in the grid
            polygon = w.locator("#pick-map .grid-area[data-grid='zhanmao-g33'] polygon")
            await expect(polygon).to_have_count(1)
            await polygon.click()
            await expect(w.locator("#f-where")).to_contain_text("地图选点")
            await expect(w.locator("#f-where .in-grid")).to_be_visible()
            await expect(w.locator("#pick-map .pin")).to_have_count(1)
            await w.get_by_role("button", name="用GPS定位").click()
            await expect(w.locator("#f-where")).to_contain_text("30.035, 122.2454")
            await w.locator("#f-photo").set_input_files(str(photo))
            await expect(w.locator(".thumbs img")).to_have_count(1)
            await w.get_by_label("集体上访", exact=False).check()
            await fits(w)
            await w.screenshot(path=str(SHOTS / "1-worker-report.png"), full_page=True)
            # a bad connection: the first answer is lost after needle recorded the report; the page retries with
            # the same Idempotency-Key and gets the same issue (one report, not two)
            posts: list[str] = []

            async def lose_first_answer(route: Any) -> None:
                posts.append(route.request.headers.get("idempotency-key", ""))
                if route.request.method == "POST" and len(posts) == 1:
                    await route.fetch()  # reaches needle, which records the report
                    await route.abort("connectionreset")
                else:
                    await route.continue_()
            await w.route("**/v1/issues", lose_first_answer)
            allowed.append("ERR_CONNECTION_RESET")
            await w.get_by_role("button", name="提交上报").click()
            await w.locator("#flash:not([hidden])").wait_for(timeout=15_000)
            allowed.clear()
            await w.unroute("**/v1/issues")
            assert len(posts) == 2 and posts[0] == posts[1] != "", posts
            assert await w.locator("#flash.ok").count() == 1, await w.locator("#flash").text_content()
            await expect(w.locator("main h1")).to_have_text(TITLE)
            await expect(w.locator(".flash.ok")).to_contain_text("已上报")
            issue_id = (await w.locator(".flash.ok code").text_content() or "").strip()
            body = (await h.client.get(f"/v1/issues/{issue_id}", headers=h.auth(*gw))).json()
            assert body["status"] == "pending_review" and body["tasks"] == []  # held for 受理
            mine = await h.wait_for("/v1/issues?area=zhanmao-g33", h.auth(*gw), lambda b: len(b["items"]) >= 1)
            assert [i["id"] for i in mine["items"] if i["title"] == TITLE] == [issue_id]  # the retry made no second
            assert (body["location"]["lat"], body["location"]["lon"]) == (30.035, 122.2454)
            assert body["risk"] == ["collective_petition"]
            assert body["category"] == "construction_nuisance"
            assert body["description_public"] is True
            assert [m["phase"] for m in body["media"]] == ["before"]
            await expect(w.locator(".photos img.photo[src^='blob:']")).to_have_count(1)  # read back with the token
            await fits(w)

            # the same blasting reported by the grid's other worker, through the API (the story's setup, not a page)
            other = h.auth(*gw, subject="gw-zhanmao-33b")
            media = (await h.client.post("/v1/media", content=PNG, headers=other | {"Content-Type": "image/png"}))
            dup = await h.client.post("/v1/issues", headers=other, json={
                "grid": "zhanmao-g33", "category": "construction_nuisance", "title": DUPLICATE,
                "location": {"lat": 30.0352, "lon": 122.2456},
                "media": [{"id": media.json()["id"], "phase": "before"}]})
            assert dup.status_code == 201, dup.text
            dup_id = dup.json()["id"]

            # 2. the command centre finds it in the triage queue and accepts it (受理): dispatched by the rules
            await h.wait_for("/v1/issues?area=zhanmao&status=pending_review", h.auth(*sup),
                             lambda b: {issue_id, dup_id} <= {i["id"] for i in b["items"]})
            c = watch(await desk.new_page())
            await c.goto(f"{h.base_url}/app/#token={h.token(*sup)}")
            await expect(c.locator("#queue .item", has_text=TITLE)).to_be_visible()
            # the map: 展茅's grids from their GeoJSON boundaries, the report a marker that opens it
            await expect(c.locator("#map .grid-area[data-grid='zhanmao-g33'] polygon")).to_have_count(1)
            assert await c.locator("#map .grid-area").count() >= 4
            marker = c.locator(f"#map a.marker[data-issue='{issue_id}']")
            await expect(marker).to_have_count(1)
            await c.screenshot(path=str(SHOTS / "2-centre.png"), full_page=True)
            # 合并办理: the neighbour's call shows the first report as a similar issue nearby (on a map); merged into it
            await c.locator("#queue .item", has_text=DUPLICATE).click()
            similar = c.locator("#similar li", has_text=TITLE)
            await expect(similar).to_have_count(1)
            await expect(c.locator(f"#similar-map a.marker[data-issue='{issue_id}']")).to_have_count(1)
            await c.screenshot(path=str(SHOTS / "2-centre-similar.png"), full_page=True)
            await similar.get_by_role("button", name="并入此件").click()
            await expect(c.locator(".flash.ok")).to_contain_text("已合并办理")
            await expect(c.locator("#issue-status .status")).to_contain_text("已合并办理")
            await h.wait_for(f"/v1/issues/{dup_id}", h.auth(*sup), lambda b: b["merged_into"] == issue_id)
            await c.get_by_role("button", name="总览").first.click()
            await marker.click()
            await c.get_by_label("理由").fill("情况属实，予以受理")
            await c.screenshot(path=str(SHOTS / "2-centre-triage.png"), full_page=True)
            await c.get_by_role("button", name="受理", exact=False).first.click()
            await expect(c.locator(".flash.ok")).to_contain_text("已受理")
            await h.wait_for(f"/v1/issues/{issue_id}", h.auth(*gw),
                             lambda b: any(t["department"] == "zhanmao-center" for t in b["tasks"]))
            # 改派 without a reason: the server's problem+json in words, naming the field (the issue opened anew:
            # the router dispatches after the accept, so the first view may have had no tasks yet)
            await c.goto(f"{h.base_url}/app/?issue={issue_id}")
            allowed.append("422")
            await c.locator(".task-control").first.get_by_role("button", name="改派").click()
            await expect(c.locator("#flash.error")).to_contain_text("填写有误")
            await expect(c.locator("#flash.error")).to_contain_text("reason")
            allowed.clear()

            # 3. the handler: a refused return says why in words, then acknowledge and resolve with a photo
            hp = watch(await desk.new_page())
            await hp.goto(f"{h.base_url}/app/#token={h.token(*handler)}")
            await hp.locator(".item", has_text=TITLE).click()
            await hp.get_by_role("button", name="签收响应").wait_for()
            await hp.locator("details summary").click()
            allowed.append("422")
            await hp.get_by_role("button", name="申请退单").click()
            problem = hp.locator("#flash.error")
            await expect(problem).to_contain_text("填写有误")
            await expect(problem).to_contain_text("reason")
            allowed.clear()
            await hp.screenshot(path=str(SHOTS / "3a-handler-problem.png"), full_page=True)
            await hp.get_by_role("button", name="签收响应").click()
            await expect(hp.locator(".flash.ok")).to_contain_text("已签收")
            # the lead reports progress to everyone on the issue (comments, issue 19)
            await hp.get_by_label("类型").select_option("progress")
            await hp.get_by_label("内容").fill(COMMENT)
            await hp.get_by_role("button", name="发送").click()
            await expect(hp.locator("#comments .comment.k-progress")).to_contain_text(COMMENT)
            # the lead asks to suspend (缓办) until the blasting ends; the command centre approves it on its page
            await hp.locator("#t-more summary").click()
            await hp.get_by_label("理由").fill("爆破工期未结束，待工程完工后复核")
            await hp.get_by_role("button", name="申请缓办").click()
            await expect(hp.locator(".flash.ok")).to_contain_text("缓办申请已提交")
            await expect(hp.locator("#t-flags")).to_contain_text("缓办待审批")
            await hp.screenshot(path=str(SHOTS / "3b-handler-comment-suspend.png"), full_page=True)
            await c.get_by_role("button", name="总览").first.click()
            request = c.locator("#approvals li[data-request='suspend']", has_text=TITLE)
            await expect(request).to_have_count(1, timeout=15_000)  # the page refetches on the SSE nudge
            await request.get_by_label("审批意见").fill("同意缓办")
            await c.screenshot(path=str(SHOTS / "3c-centre-approvals.png"), full_page=True)
            await request.get_by_role("button", name="批准").click()
            await expect(c.locator(".flash.ok")).to_contain_text("已批准")
            await expect(c.locator("#approvals li[data-request='suspend']", has_text=TITLE)).to_have_count(0)
            paused = await h.wait_for(f"/v1/issues/{issue_id}", h.auth(*gw), lambda b: b["suspended_until"] is not None)
            assert [t["suspended"] for t in paused["tasks"] if t["department"] == "zhanmao-center"] == [True]
            # the lead sees it suspended, resumes when the work can go on, then resolves with the after-photo
            await h.wait_for("/v1/tasks?status=suspended", h.auth(*handler), lambda b: len(b["items"]) == 1)
            await hp.reload()
            await hp.locator(".item", has_text=TITLE).click()
            await expect(hp.locator("#t-flags")).to_contain_text("缓办中")
            await hp.get_by_role("button", name="恢复办理").click()
            await expect(hp.locator(".flash.ok")).to_contain_text("已恢复")
            await hp.get_by_label("处理说明").fill("已与施工方约定爆破时段并公示")
            await hp.get_by_label("处理后照片").set_input_files(str(photo))
            await hp.screenshot(path=str(SHOTS / "3d-handler-task.png"), full_page=True)
            await hp.get_by_role("button", name="办结反馈").click()
            await expect(hp.locator(".flash.ok")).to_contain_text("已办结")
            resolved = await h.wait_for(f"/v1/issues/{issue_id}", h.auth(*gw), lambda b: b["status"] == "resolved")
            assert sorted(m["phase"] for m in resolved["media"]) == ["after", "before"]

            # 4. the grid worker verifies on the spot and records the resident's 回访
            await w.get_by_role("button", name="我的上报").first.click()
            await expect(w.locator(".item", has_text=TITLE)).to_have_count(1)
            await expect(w.locator(".item", has_text=DUPLICATE)).to_have_count(0)  # the other worker's (reporter=me)
            await w.locator(".item", has_text=TITLE).click()
            await expect(w.locator(".photos figure")).to_have_count(2)  # before and after, side by side
            await expect(w.locator(".photos img.photo[src^='blob:']")).to_have_count(2)
            await expect(w.locator("#comments .comment")).to_contain_text(COMMENT)  # the lead's progress report
            await w.get_by_role("button", name="核查通过").click()
            await w.get_by_label("满意度").select_option("satisfied")
            await w.screenshot(path=str(SHOTS / "4a-worker-verify.png"), full_page=True)
            await w.get_by_role("button", name="记录回访").click()
            await expect(w.locator("#issue-status .status")).to_contain_text("已办结")
            await fits(w)
            await w.screenshot(path=str(SHOTS / "4b-worker-closed.png"), full_page=True)
            done = (await h.client.get(f"/v1/issues/{issue_id}", headers=h.auth(*gw))).json()
            assert done["status"] == "closed" and done["satisfaction"] == "satisfied"

            # the wrong role gets a page that says so: an integrator, and a grid worker asking for the workbench
            for token, query in ((h.token("integrator"), ""), (h.token(*gw), "?page=handler")):
                x = watch(await phone.new_page())
                await x.goto(f"{h.base_url}/app/{query}#token={token}")
                await expect(x.locator(".wrong-role h1")).to_contain_text("此页面不对您的角色开放")
                await fits(x)
                await x.screenshot(path=str(SHOTS / f"5-wrong-role{'-' + query[6:] if query else ''}.png"))
                await x.close()

            # every page fits the phone: the handler's and the command centre's, and the supervisor dashboard
            for token, path in ((h.token(*handler), "/app/"), (h.token(*sup), "/app/"),
                                (h.token(*sup), "/dashboard?area=zhanmao")):
                x = watch(await phone.new_page())
                await x.goto(f"{h.base_url}{path}#token={token}")
                await x.locator("main h1, #area-title:not(:empty)").first.wait_for()
                if path.startswith("/dashboard"):  # the same map on the supervisor dashboard
                    await expect(x.locator(f"#map a.marker[data-issue='{issue_id}']")).to_have_count(1)
                    await x.screenshot(path=str(SHOTS / "6-dashboard-phone.png"), full_page=True)
                await fits(x)
                await x.close()

            # the API docs draw from the package's assets (no CDN: the machine is offline)
            d = watch(await desk.new_page())
            await d.goto(f"{h.base_url}/docs")
            await d.locator(".swagger-ui .info .title").wait_for()
            await d.goto(f"{h.base_url}/redoc")
            await d.locator("h1", has_text="needle").first.wait_for()
        finally:
            await browser.close()
    assert not errors, json.dumps(errors, ensure_ascii=False, indent=1)
