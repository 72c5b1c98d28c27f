"""The demo's side of the wire: actors with tokens, HTTP calls printed as steps, waiting on the router."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import httpx
from rich.console import Console
from rich.markup import escape

from shared.config import OrgTree, Rulebook

OPEN = ("dispatched", "acknowledged")
LEVEL_ZH = {"grid": "网格", "community": "社区", "street": "街道", "district": "区", "city": "市"}
STATUS_STYLE = {"closed": "green", "resolved": "cyan", "in_progress": "yellow", "dispatched": "yellow",
                "reported": "white", "reopened": "red", "acknowledged": "cyan", "returned": "red",
                "superseded": "dim", "satisfied": "green"}


class TokenFactory(Protocol):
    def __call__(self, role: str, scope: str = "", subject: str | None = None) -> str: ...


class DemoError(Exception):
    """A step did not go as the story says (unexpected HTTP status, router too slow)."""


@dataclass(frozen=True)
class Actor:
    label: str
    role: str
    scope: str = ""


def short_type(ce_type: str) -> str:
    """``needle.task.dispatched.v1`` -> ``task.dispatched``."""
    return ce_type.removeprefix("needle.").rsplit(".", 1)[0]


class Demo:
    """One replay: an HTTP client, the org for names, a console, a clock for step times."""

    def __init__(self, http: httpx.AsyncClient, tokens: TokenFactory, console: Console, org: OrgTree,
                 rulebook: Rulebook, *, pace: float = 0.0, timeout: float = 30.0) -> None:
        self.http = http
        self.tokens = tokens
        self.console = console
        self.org = org
        self.rulebook = rulebook
        self.pace = pace
        self.timeout = timeout
        self.tz = ZoneInfo(rulebook.timezone)
        self.t0 = time.monotonic()
        self.observer = Actor("舟山市社会治理中心", "supervisor", f"area:{org.root.id}")

    # -- names ----------------------------------------------------------------------------------------------
    def area_name(self, area_id: str | None) -> str:
        if not area_id:
            return "-"
        try:
            return self.org.area(area_id).name
        except KeyError:
            return area_id

    def dept_name(self, dept_id: str) -> str:
        try:
            return self.org.department(dept_id).name
        except KeyError:
            return dept_id

    def dept_kind(self, dept_id: str) -> str:
        try:
            return self.org.department(dept_id).kind
        except KeyError:
            return ""

    def category_name(self, category: str) -> str:
        cat = self.rulebook.categories.get(category)
        return cat.name if cat else category

    def grid_worker(self, grid: str) -> Actor:
        return Actor(f"网格员 · {self.area_name(grid)}", "grid_worker", f"area:{grid}")

    def handler(self, dept: str) -> Actor:
        return Actor(self.dept_name(dept), "handler", f"dept:{dept}")

    def supervisor(self, area: str) -> Actor:
        return Actor(f"督办 · {self.area_name(area)}", "supervisor", f"area:{area}")

    def local(self, iso: str | None) -> str:
        if not iso:
            return "-"
        return datetime.fromisoformat(iso).astimezone(self.tz).strftime("%m-%d %H:%M")

    # -- output ---------------------------------------------------------------------------------------------
    def stamp(self) -> str:
        return f"[dim]{time.monotonic() - self.t0:7.2f}s[/dim]"

    def say(self, text: str) -> None:
        self.console.print(f"{self.stamp()}  {text}", highlight=False)

    def note(self, text: str) -> None:
        self.console.print(f"           {text}", highlight=False)

    @staticmethod
    def styled(value: str | None) -> str:
        v = value or "-"
        style = STATUS_STYLE.get(v)
        return f"[{style}]{escape(v)}[/{style}]" if style else escape(v)

    def show_issue(self, issue: dict[str, Any], *, all_tasks: bool = False) -> None:
        level = issue.get("level")
        where = f"{level} {LEVEL_ZH.get(level or '', '')} · {self.area_name(issue.get('owner_area'))}"
        self.note(f"⤷ status {self.styled(issue['status'])} · level [bold]{escape(where)}[/bold]"
                  f" · v{issue['version']}")
        tasks = issue.get("tasks", [])
        superseded = [t for t in tasks if t["status"] == "superseded"]
        for t in tasks:
            if t["status"] == "superseded" and not all_tasks:
                continue
            due = ""
            if t["status"] == "dispatched":
                due = f"  [dim]签收 by {self.local(t['acknowledge_due'])} · 办结 by {self.local(t['resolve_due'])}"
                due += f" ({t['clock']})[/dim]"
            role = "[bold]lead[/bold]" if t["role"] == "lead" else "co  "
            self.note(f"    {role} {escape(self.dept_name(t['department']))} [dim]({t['level']})[/dim]"
                      f"  {self.styled(t['status'])}{due}")
        if superseded and not all_tasks:
            levels = sorted({t["level"] for t in superseded})
            self.note(f"    [dim]{len(superseded)} earlier task(s) superseded at {', '.join(levels)}[/dim]")

    async def breathe(self) -> None:
        if self.pace:
            await asyncio.sleep(self.pace)

    # -- HTTP -----------------------------------------------------------------------------------------------
    def headers(self, actor: Actor) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens(actor.role, actor.scope)}"}

    async def call(self, actor: Actor, what: str, method: str, path: str, *, json: Any = None,
                   idempotency_key: str | None = None, expect: tuple[int, ...] = (200, 201, 202),
                   quiet: bool = False) -> Any:
        headers = self.headers(actor)
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        r = await self.http.request(method, path, json=json, headers=headers)
        ok = r.status_code in expect
        body = r.json() if ok and r.content else None
        if not quiet or not ok:
            colour = "green" if ok else "red"
            self.say(f"[bold]{escape(actor.label)}[/bold]  {escape(what)}  "
                     f"[{colour}]{method} {escape(path)} → {r.status_code}[/{colour}]{self._outcome(body)}")
        if not ok:
            detail = r.text[:400]
            self.note(f"[red]{escape(detail)}[/red]")
            raise DemoError(f"{actor.label}: {method} {path} answered {r.status_code}: {detail}")
        if not quiet:
            await self.breathe()
        return body

    def _outcome(self, body: Any) -> str:
        """`` · task acknowledged · issue in_progress`` from a task or issue response."""
        if not isinstance(body, dict) or "status" not in body:
            return ""
        if isinstance(body.get("issue"), dict):
            return f" · task {self.styled(body['status'])} · issue {self.styled(body['issue']['status'])}"
        return f" · issue {self.styled(body['status'])}"

    async def issue(self, issue_id: str) -> dict[str, Any]:
        r = await self.http.get(f"/v1/issues/{issue_id}", headers=self.headers(self.observer))
        if r.status_code != 200:
            raise DemoError(f"GET /v1/issues/{issue_id} answered {r.status_code}: {r.text[:300]}")
        body: dict[str, Any] = r.json()
        return body

    async def events(self, issue_id: str) -> list[dict[str, Any]]:
        r = await self.http.get(f"/v1/issues/{issue_id}/events", headers=self.headers(self.observer))
        if r.status_code != 200:
            raise DemoError(f"GET /v1/issues/{issue_id}/events answered {r.status_code}: {r.text[:300]}")
        body: list[dict[str, Any]] = r.json()
        return body

    async def wait_issue(self, issue_id: str, predicate: Callable[[dict[str, Any]], bool], what: str
                         ) -> dict[str, Any]:
        """Poll the issue until ``predicate`` holds (the router works asynchronously)."""
        deadline = time.monotonic() + self.timeout
        while True:
            issue = await self.issue(issue_id)
            if predicate(issue):
                return issue
            if time.monotonic() > deadline:
                raise DemoError(f"issue {issue_id}: timed out waiting for {what}; status {issue['status']}, "
                                f"level {issue.get('level')}")
            await asyncio.sleep(0.05)

    async def wait_routed(self, issue_id: str, level: str | None = None) -> dict[str, Any]:
        """Until the router has dispatched an open lead (at ``level`` when given), then print it."""
        def routed(i: dict[str, Any]) -> bool:
            leads = [t for t in i["tasks"] if t["role"] == "lead" and t["status"] in OPEN]
            return bool(leads) and (level is None or (i["level"] == level and leads[-1]["level"] == level))

        issue = await self.wait_issue(issue_id, routed, f"routing to {level or 'a level'}")
        lead = next(t for t in reversed(issue["tasks"]) if t["role"] == "lead" and t["status"] in OPEN)
        n_co = sum(1 for t in issue["tasks"] if t["role"] == "co" and t["status"] in OPEN)
        self.say(f"[bold magenta]router[/bold magenta]  routed to {issue['level']} "
                 f"{escape(self.area_name(issue.get('owner_area')))}: lead "
                 f"{escape(self.dept_name(lead['department']))}" + (f" + {n_co} co-handler(s)" if n_co else ""))
        self.note(f"[dim]rule: {escape(issue.get('rule') or '-')}[/dim]")
        self.show_issue(issue)
        await self.breathe()
        return issue

    # -- task work ------------------------------------------------------------------------------------------
    @staticmethod
    def open_tasks(issue: dict[str, Any]) -> list[dict[str, Any]]:
        """Open tasks, lead first."""
        tasks = [t for t in issue["tasks"] if t["status"] in OPEN]
        return sorted(tasks, key=lambda t: t["role"] != "lead")

    async def acknowledge(self, task: dict[str, Any], what: str = "签收 acknowledges its task") -> dict[str, Any]:
        out: dict[str, Any] = await self.call(self.handler(task["department"]), what, "POST",
                                              f"/v1/tasks/{task['id']}/acknowledge")
        return out

    async def upload_photo(self, actor: Actor, what: str, data: bytes) -> str:
        """POST /v1/media (a PNG); the medium's id."""
        headers = self.headers(actor) | {"Content-Type": "image/png"}
        r = await self.http.post("/v1/media", content=data, headers=headers)
        if r.status_code != 201:
            raise DemoError(f"{actor.label}: POST /v1/media answered {r.status_code}: {r.text[:300]}")
        body = r.json()
        self.say(f"[bold]{escape(actor.label)}[/bold]  {escape(what)}  [green]POST /v1/media → 201[/green] "
                 f"· {body['content_type']} {body['width']}x{body['height']}, {body['bytes']} bytes, "
                 f"id {body['id'][:12]}…")
        return str(body["id"])

    async def resolve(self, task: dict[str, Any], note: str, media: list[dict[str, str]] | None = None
                      ) -> dict[str, Any]:
        what = f"办结 resolves: {note}" + (" (with the after-photo)" if media else "")
        body: dict[str, Any] = {"note": note} | ({"media": media} if media else {})
        out: dict[str, Any] = await self.call(self.handler(task["department"]), what, "POST",
                                              f"/v1/tasks/{task['id']}/resolve", json=body)
        return out

    async def work_all(self, issue_id: str, lead_note: str, co_notes: dict[str, str],
                       lead_media: list[dict[str, str]] | None = None) -> dict[str, Any]:
        """Every open task is acknowledged (lead first), co-handlers resolve, then the lead resolves."""
        issue = await self.issue(issue_id)
        tasks = self.open_tasks(issue)
        for t in tasks:
            if t["status"] == "dispatched":
                await self.acknowledge(t)
        for t in tasks:
            if t["role"] == "co":
                kind = self.dept_kind(t["department"])
                await self.resolve(t, co_notes.get(kind, "协办事项已完成"))
        lead = next(t for t in tasks if t["role"] == "lead")
        out = await self.resolve(lead, lead_note, lead_media)
        self.show_issue(out["issue"])
        return dict(out["issue"])

    async def verify_and_feedback(self, issue_id: str, grid: str, note: str,
                                  satisfaction: str = "satisfied") -> dict[str, Any]:
        gw = self.grid_worker(grid)
        closed = await self.call(gw, f"核查 verifies on site: {note}", "POST", f"/v1/issues/{issue_id}/verify",
                                 json={"passed": True, "note": note})
        self.show_issue(closed)
        fb = await self.call(gw, f"回访 records resident feedback: {satisfaction}", "POST",
                             f"/v1/issues/{issue_id}/feedback", json={"satisfaction": satisfaction})
        return dict(fb)
