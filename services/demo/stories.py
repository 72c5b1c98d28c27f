"""The four Zhoushan stories of DOMAIN.md, replayed against a running needle over HTTP.

``run_stories(base_url, token_factory, console)`` is what ``needle demo`` and the integration test call.
Every story ends with its issues closed; the returned :class:`DemoResult` says whether they all are.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn

from shared.config import OrgTree, Rulebook, load_org, load_rulebook
from shared.settings import REPO_DEPLOY

from .client import OPEN, Demo, DemoError, TokenFactory
from .photos import slope_photo
from .results import DemoResult, StoryResult, trail
from .summary import summary_table

DEMO_ORG = REPO_DEPLOY / "org" / "zhoushan.yaml"
DEMO_RULES = REPO_DEPLOY / "rules" / "zhoushan.yaml"


# -- ① slope works, grid 33 ----------------------------------------------------------------------------------
async def slope_works(d: Demo, run: str, res: StoryResult) -> None:
    grid, team = "zhanmao-g33", "zhanmao-g33-team"
    d.note("[italic]组团式服务: 第33网格服务团队走访大展社区, 居民反映边坡工程噪声、扬尘、爆破震动[/italic]")
    visit = await d.call(d.handler(team), "走访 visits a household (household key kept only as an HMAC)", "POST",
                         "/v1/visits", idempotency_key=f"{run}-slope-visit", json={
                             "grid": grid, "household": "张家宕12号", "kind": "routine",
                             "note": "居民反映边坡工程施工噪声、扬尘、爆破震动, 邻里酝酿集体上访"})
    d.note(f"⤷ visit {visit['id']} · household [dim]{visit['household'][:12]}…[/dim] (HMAC)")
    before = await d.upload_photo(d.grid_worker(grid), "拍照 photographs the dust over the slope (before)",
                                  slope_photo(after=False))
    created = await d.call(d.grid_worker(grid),
                           "上报 reports 施工扰民 from the visit, with the photo, risk flag 集体上访苗头",
                           "POST", "/v1/issues", idempotency_key=f"{run}-slope", json={
                               "grid": grid, "category": "construction_nuisance", "visit": visit["id"],
                               "title": "张家宕边坡工程噪声、扬尘、爆破震动扰民",
                               "description": "居民反映边坡工程施工噪声大、扬尘重、爆破震动影响房屋,"
                                              " 部分居民酝酿集体上访",
                               "risk": ["collective_petition"], "media": [{"id": before, "phase": "before"}],
                               "location": {"lat": 30.035, "lon": 122.2454, "address": "展茅街道张家宕"}})
    iid = created["id"]
    res.issue_ids.append(iid)
    d.note(f"⤷ issue {iid} {d.styled(created['status'])}")
    linked = await _visit(d, visit["id"], d.handler(team))
    d.note(f"⤷ visit {visit['id']} lists the issues raised from it: {', '.join(linked['issues'])}")
    await d.wait_routed(iid, "street")
    d.note("[italic]次日, 街道领导带相关部门负责人和网格团队到现场[/italic]")
    measures = "召开居民、妇女、党员等座谈会7场; 责令施工方限制爆破药量、避开休息时间、清扫道路; 落实跟踪回访"
    lead = d.open_tasks(await d.issue(iid))[0]
    after = await d.upload_photo(d.handler(lead["department"]), "拍照 photographs the sprayed slope (after)",
                                 slope_photo(after=True))
    await d.work_all(iid, measures, lead_media=[{"id": after, "phase": "after"}], co_notes={
        "urban_management": "现场执法: 爆破作业避开居民休息时段, 渣土车辆冲洗上路",
        "ecology_environment": "扬尘、噪声监测达标, 增设喷淋降尘",
        "housing_construction": "督促施工单位限制爆破药量, 震动影响房屋逐户排查",
    })
    photos = ", ".join(f"{m['phase']} ({m['stage']}) {m['id'][:12]}…" for m in (await d.issue(iid))["media"])
    d.note(f"[italic]核查 compares the photos: {photos}[/italic]")
    await d.verify_and_feedback(iid, grid, "爆破药量已减、作业时段已调整、道路已清扫, 居民情绪平稳")


async def _visit(d: Demo, visit_id: str, reader: Any) -> dict[str, Any]:
    """The visit from the read models, once they hold the report raised from it."""
    deadline = time.monotonic() + d.timeout
    while True:
        r = await d.http.get(f"/v1/visits/{visit_id}", headers=d.headers(reader))
        if r.status_code == 200 and r.json()["issues"]:
            body: dict[str, Any] = r.json()
            return body
        if time.monotonic() > deadline:
            raise DemoError(f"GET /v1/visits/{visit_id} answered {r.status_code}: {r.text[:300]}")
        await asyncio.sleep(0.05)


# -- ② sea safety, 蚂蚁岛, Qingming 2009 -----------------------------------------------------------------------
async def sea_safety(d: Demo, run: str, res: StoryResult) -> None:
    grid = "mayidao-g1"
    created = await d.call(d.grid_worker(grid), "上报 reports 海上安全, urgency emergency (清明, 恶劣天气)",
                           "POST", "/v1/issues", idempotency_key=f"{run}-sea", json={
                               "grid": grid, "category": "sea_safety", "urgency": "emergency",
                               "title": "清明恶劣天气, 大批群众需乘小船渡海前往无人岛祭扫",
                               "description": "风浪大, 自发渡海船只无安全保障, 请求海上安全保障",
                               "location": {"lat": 29.862, "lon": 122.3678, "address": "蚂蚁岛码头"}})
    iid = created["id"]
    res.issue_ids.append(iid)
    d.note(f"⤷ issue {iid} {d.styled(created['status'])}")
    issue = await d.wait_routed(iid, "district")
    lead = next(t for t in issue["tasks"] if t["role"] == "lead")
    d.note(f"[italic]natural-time clocks (holidays count): 签收 by {d.local(lead['acknowledge_due'])}, "
           f"办结 by {d.local(lead['resolve_due'])}[/italic]")
    await d.work_all(iid, "渔政船一艘、执法人员6名一小时内到场, 护送群众安全往返", {
        "maritime_police": "海警艇协同护航, 劝阻无证船只载客",
    })
    await d.verify_and_feedback(iid, grid, "群众已安全返回, 渡海秩序良好")


# -- ③ care home, 葫芦岛 --------------------------------------------------------------------------------------
async def care_home(d: Demo, run: str, res: StoryResult) -> None:
    grid = "huludao-g1"
    gw = d.grid_worker(grid)
    created = await d.call(gw, "上报 reports 养老服务: 九成居民是老人, 养老院多年未解决", "POST", "/v1/issues",
                           idempotency_key=f"{run}-care", json={
                               "grid": grid, "category": "elderly_care", "title": "葫芦岛养老院建设多年未解决",
                               "description": "岛上居民九成为老年人, 缺少养老院, 老人就近养老需求强烈",
                               "location": {"lat": 29.752, "lon": 122.2628, "address": "虾峙镇葫芦岛"}})
    iid = created["id"]
    res.issue_ids.append(iid)
    d.note(f"⤷ issue {iid} {d.styled(created['status'])}")
    issue = await d.wait_routed(iid, "community")
    lead = d.open_tasks(issue)[0]
    await d.call(d.handler(lead["department"]), "退单 returns the task: 超出社区权限 (用地、资金、审批)", "POST",
                 f"/v1/tasks/{lead['id']}/return",
                 json={"reason": "超出社区权限: 养老院用地、资金和审批需上级统筹"})
    issue = await d.wait_routed(iid, "street")
    street_lead = d.open_tasks(issue)[0]
    await d.acknowledge(street_lead, "签收: 镇里牵头, 协调社工站、慈善分会、志愿者")
    out = await d.call(gw, "逐级反映 escalates one level up: 需区级民政、卫健、住建、自然资源多部门整合",
                       "POST", f"/v1/issues/{iid}/escalate",
                       json={"reason": "养老院建设涉及用地、资金、医养结合, 镇级无力解决, 逐级反映"})
    d.show_issue(out)
    issue = await d.wait_routed(iid, "district")
    await _long_work(d, issue)
    hops = trail(await d.events(iid))
    d.note("escalation path (逐级反映): " + " → ".join(
        f"[bold]{h.level}[/bold] {escape(d.area_name(h.owner_area))} ({escape(d.dept_name(h.lead or '-'))})"
        for h in hops))
    await d.work_all(iid, "区民政局牵头整合资金与政策, 养老院半年内建成投用", {
        "health": "医养结合: 卫生院派驻医生定期巡诊",
        "housing_construction": "闲置校舍改建方案审批通过, 完成施工",
        "natural_resources": "用地手续办结",
        "command_center": "区社会治理中心督办, 按月跟踪里程碑",
    })
    await d.verify_and_feedback(iid, grid, "养老院已建成, 首批老人入住")


async def _long_work(d: Demo, issue: dict[str, Any]) -> None:
    """Six months of work: the lead reports progress (阶段性答复) and its clocks are suspended (缓办) while the land
    and the funds are approved, instead of breaching every week; then they run again with the time that was left."""
    lead = d.open_tasks(issue)[0]
    who, path = d.handler(lead["department"]), f"/v1/issues/{issue['id']}/comments"
    await d.call(who, "阶段性答复 progress report: 选址完成, 资金申请已报区财政", "POST", path,
                 json={"kind": "progress", "text": "选址完成 (闲置校舍), 资金申请已报区财政"})
    until = (datetime.now(UTC) + timedelta(days=60)).isoformat()
    await d.call(who, "缓办 asks to suspend the clocks: 等待用地审批和资金下达", "POST",
                 f"/v1/tasks/{lead['id']}/suspend", json={"reason": "等待用地审批和资金下达", "until": until})
    out = await d.call(d.supervisor(issue["owner_area"]), "批准缓办 approves the suspension (review in 60 days)",
                       "POST", f"/v1/tasks/{lead['id']}/suspend/approve")
    d.note(f"⤷ clocks paused until {d.local(out['suspended_until'])}")
    await d.call(who, "阶段性答复 progress report: 用地手续办结, 开工改建", "POST", path,
                 json={"kind": "progress", "text": "用地手续办结, 资金到位, 开工改建"})
    await d.call(who, "恢复 resumes: the clocks run again with the time that was left", "POST",
                 f"/v1/tasks/{lead['id']}/resume")


# -- ④ infant census, melamine 2008 -----------------------------------------------------------------------------
async def _campaign(d: Demo, cid: str, area: str) -> dict[str, Any]:
    r = await d.http.get(f"/v1/campaigns/{cid}", params={"area": area}, headers=d.headers(d.supervisor(area)))
    if r.status_code != 200:
        raise DemoError(f"GET /v1/campaigns/{cid} answered {r.status_code}: {r.text[:300]}")
    body: dict[str, Any] = r.json()
    return body


def infant_households(grid: str) -> int:
    """The households of a grid with a child under three (from the grid's own register; illustrative)."""
    return 1 + sum(map(ord, grid)) % 9


async def _census_grid(d: Demo, sem: asyncio.Semaphore, cid: str, item: dict[str, Any]) -> None:
    iid, grid = item["id"], item["grid"]
    async with sem:
        issue = await d.wait_issue(iid, lambda i: any(t["role"] == "lead" and t["status"] in OPEN
                                                       for t in i["tasks"]), "dispatch")
        lead = d.open_tasks(issue)[0]
        h = d.handler(lead["department"])
        await d.call(h, "签收", "POST", f"/v1/tasks/{lead['id']}/acknowledge", quiet=True)
        babies = infant_households(grid)
        for n in range(1, babies + 1):  # every targeted household, door to door
            await d.call(d.grid_worker(grid), "走访", "POST", "/v1/visits", quiet=True,
                         idempotency_key=f"{cid}-{grid}-{n}",
                         json={"grid": grid, "household": f"婴幼儿户-{n:02d}", "kind": "campaign", "campaign": cid,
                               "note": "已登记, 已告知停用问题奶粉"})
        await d.call(h, "办结", "POST", f"/v1/tasks/{lead['id']}/resolve", quiet=True,
                     json={"note": f"逐户走访, 登记三岁以下婴幼儿{babies}户, 已告知停用问题奶粉"})
        closed = await d.call(d.grid_worker(grid), "核查", "POST", f"/v1/issues/{iid}/verify", quiet=True,
                              json={"passed": True, "note": "抽查入户记录属实"})
    d.say(f"{escape(d.area_name(grid)):<10} {escape(d.dept_name(lead['department']))} 签收 → 办结 · "
          f"网格员核查 → {d.styled(closed['status'])}")


async def infant_census(d: Demo, run: str, res: StoryResult) -> None:
    area = "putuo"
    sup = d.supervisor(area)
    grids = [g.id for g in d.org.grids_under(area)]
    body = {"area": area, "category": "infant_census", "title": "三岁以下婴幼儿排查走访",
            "description": "奶粉事件: 数日内逐格排查、走访每一名三岁以下婴幼儿",
            "households": {g: infant_households(g) for g in grids}}
    key = f"{run}-census"
    c = await d.call(sup, f"launches a campaign over {d.area_name(area)}: one task per grid", "POST",
                     "/v1/campaigns", json=body, idempotency_key=key)
    cid, n = c["id"], c["issues"]
    res.campaign = cid
    d.note(f"⤷ campaign {cid}: {n} grids → {c['created']} issues, {c['households_target']} households to visit")
    again = await d.call(sup, "retries the same request (same Idempotency-Key)", "POST", "/v1/campaigns",
                         json=body, idempotency_key=key)
    if again["id"] != cid or again["created"] != 0:
        raise DemoError(f"campaign retry was not idempotent: {again}")
    d.note(f"⤷ same campaign {again['id']}, {again['created']} new issues: no duplicates")
    deadline = time.monotonic() + d.timeout
    while (status := await _campaign(d, cid, area))["status"].get("reported", 0):
        if time.monotonic() > deadline:
            raise DemoError(f"campaign {cid}: issues still unrouted: {status['status']}")
        await asyncio.sleep(0.1)
    res.issue_ids.extend(i["id"] for i in status["items"])
    leads = Counter(d.dept_kind(i["lead"]) for i in status["items"] if i["lead"])
    d.say(f"[bold magenta]router[/bold magenta]  routed all {status['issues']} issues: levels {status['levels']}, "
          f"leads by kind {dict(leads)}")
    await d.breathe()

    sem = asyncio.Semaphore(8)
    columns = (TextColumn("[bold]婴幼儿排查 completion"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn())
    with Progress(*columns, console=d.console) as progress:
        bar = progress.add_task("census", total=status["issues"])
        workers = asyncio.gather(*(_census_grid(d, sem, cid, i) for i in status["items"]))
        while True:
            status = await _campaign(d, cid, area)
            progress.update(bar, completed=status["done"])
            if status["done"] >= status["issues"] or workers.done():
                break
            await asyncio.sleep(0.2)
        await workers
        status = await _campaign(d, cid, area)
        progress.update(bar, completed=status["done"])
    d.say(f"campaign {cid}: [bold]{status['done']}/{status['issues']} closed ({status['percent']}%)[/bold] "
          f"status {status['status']}")
    hh = status["households"]
    if hh is None or hh["reached"] < hh["target"] or hh["lagging"]:
        raise DemoError(f"campaign {cid} did not reach every targeted household: {hh}")
    d.say(f"households reached [bold]{hh['reached']}/{hh['target']} ({hh['rate']:.0%})[/bold] in "
          f"{len(hh['grids'])} grids · lagging grids: {', '.join(hh['lagging']) or 'none'}")
    r = await d.http.get("/v1/visits/coverage", params={"area": area}, headers=d.headers(sup))
    if r.status_code == 200:
        total = r.json()["total"]
        d.note(f"⤷ 入户率 of {escape(d.area_name(area))} this period: {total['visited']}/{total['households']} "
               f"households ({total['rate'] or 0:.1%}), {total['visits']} visits — on the dashboard")


STORIES = (
    ("slope", "① 展茅 第33网格 · 边坡工程施工扰民 — heard on a visit; a risk flag lifts it to the street at once",
     slope_works),
    ("sea", "② 蚂蚁岛 · 清明海上安全 — an emergency goes straight to a district bureau, hours-scale", sea_safety),
    ("care", "③ 葫芦岛 · 养老院 — returned, then escalated level by level to the district", care_home),
    ("census", "④ 奶粉事件 · 婴幼儿排查 — a district campaign, one task per grid, every targeted household visited",
     infant_census),
)


async def run_stories(base_url: str, token_factory: TokenFactory, console: Console, *, pace: float = 0.0,
                      org: OrgTree | None = None, rulebook: Rulebook | None = None,
                      timeout: float = 30.0, only: tuple[str, ...] = ()) -> DemoResult:
    """Replay the four stories against the needle at ``base_url``; tokens come from ``token_factory``."""
    org = org or load_org(DEMO_ORG)
    rulebook = rulebook or load_rulebook(DEMO_RULES)
    run = f"demo-{datetime.now().strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
    result = DemoResult(stories=[])
    async with httpx.AsyncClient(base_url=base_url, timeout=15) as http:
        d = Demo(http, token_factory, console, org, rulebook, pace=pace, timeout=timeout)
        for key, title, story in STORIES:
            if only and key not in only:
                continue
            res = StoryResult(key=key, title=title)
            result.stories.append(res)
            console.rule(f"[bold]{escape(title)}")
            try:
                await story(d, run, res)
            except (DemoError, httpx.HTTPError) as exc:
                res.error = str(exc) or type(exc).__name__
                console.print(f"[bold red]story {key} failed:[/bold red] {escape(res.error)}")
        console.rule("[bold]summary")
        for res in result.stories:
            for iid in res.issue_ids:
                try:
                    result.issues[iid] = await d.issue(iid)
                    if res.campaign is None:
                        result.trails[iid] = trail(await d.events(iid))
                except (DemoError, httpx.HTTPError) as exc:
                    res.error = res.error or str(exc)
        console.print(summary_table(d, result))
    closed = sum(1 for i in result.issues.values() if i.get("status") == "closed")
    verdict = "[bold green]every issue closed[/bold green]" if result.all_closed else \
        f"[bold red]NOT all closed: {closed}/{sum(len(s.issue_ids) for s in result.stories)}[/bold red]"
    console.print(verdict)
    return result
