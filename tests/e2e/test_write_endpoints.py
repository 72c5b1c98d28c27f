"""Every write endpoint, driven to its documented success on the topology users run: ``needle up`` with the router
and the projections in child processes (the in-process tests run every service in one process, which hid a 500:
extension approval read the router's clocks). The list of write endpoints is the served app's own route table
(``/openapi.json``), so a new write route without a case here fails; the documented success is the 2xx code
that the OpenAPI document declares for the operation."""
from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.entrypoints.processes import free_port
from shared import auth
from tests.e2e.test_needle_up import RULES, Up, _cleanup

WRITE_METHODS = ("post", "put", "patch", "delete")
GRID = "wuxing-g1"
REPORT = {"grid": GRID, "category": "road_damage", "title": "e2e 路面破损"}


def _children(pid: int) -> dict[int, str]:
    """The child processes of ``pid``, with their command lines."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, ValueError, IndexError):
            continue
    return out


class Needle:
    def __init__(self, up: Up) -> None:
        self.up = up
        self.http = up.wait_ready()
        self.key = auth.load_or_create_key(up.data_dir)
        self.documented: dict[tuple[str, str], int] = {}
        self.seen: dict[tuple[str, str], int] = {}

    def auth(self, role: str, scope: str = "") -> dict[str, str]:
        token = auth.issue_token(self.key, role=role, scope=scope, subject=f"{role}-{uuid.uuid4().hex[:6]}")
        return {"Authorization": f"Bearer {token}"}

    def call(self, method: str, route: str, path: str | None = None, **kw: Any) -> httpx.Response:
        """Call ``route`` (as declared; ``path`` fills its parameters) and record what it answered."""
        r = self.http.request(method, path or route, **kw)
        self.seen[(method.lower(), route)] = r.status_code
        return r

    def issue(self, issue_id: str, pred: Callable[[dict[str, Any]], bool] = lambda b: bool(b.get("tasks"))
              ) -> dict[str, Any]:
        admin = self.auth("admin")
        body: dict[str, Any] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            r = self.http.get(f"/v1/issues/{issue_id}", headers=admin)
            if r.status_code == 200 and pred(body := r.json()):
                return body
            time.sleep(0.05)
        raise AssertionError(f"issue {issue_id} never got there: {body}")

    def report(self, gw: dict[str, str], **extra: Any) -> str:
        r = self.call("POST", "/v1/issues", json=REPORT | extra, headers=gw | {"Idempotency-Key": str(uuid.uuid4())})
        assert r.status_code == 201, r.text
        issue_id: str = r.json()["id"]
        return issue_id


@pytest.fixture(scope="module")
def needle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Needle]:
    root = tmp_path_factory.mktemp("writes")
    rules = root / "rules.yaml"  # the contract rulebook with returns reviewed by the command centre (issue 19)
    rules.write_text(RULES.read_text() + "\nreturn: {approval: command_center}\n")
    # the integrator's webhook below points at this machine: the operator's allow-list of private targets
    up = Up(root / "data", free_port(), rules=rules, env={"NEEDLE_WEBHOOK_ALLOW_PRIVATE": "127.0.0.1"})
    try:
        yield Needle(up)
    finally:
        _cleanup([up])


def _png() -> bytes:
    """A small real PNG (the type is read from the bytes)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 120, 40)).save(buf, "PNG")
    return buf.getvalue()


def lead(issue: dict[str, Any]) -> str:
    task_id: str = next(t["id"] for t in issue["tasks"] if t["role"] == "lead" and t["status"] != "superseded")
    return task_id


def test_every_write_endpoint_answers_its_documented_success_under_needle_up(needle: Needle) -> None:
    n = needle
    spec = n.http.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method in WRITE_METHODS:
                n.documented[(method, path)] = min(int(c) for c in op["responses"] if c.startswith("2"))
    gw, sup = n.auth("grid_worker", f"area:{GRID}"), n.auth("supervisor", "area:huannan")
    roads, admin = n.auth("handler", "dept:dinghai-roads"), n.auth("admin")
    district, center = n.auth("supervisor", "area:dinghai"), n.auth("handler", "dept:dinghai-center")

    # the whole loop of one issue: report, acknowledge, extension asked and approved, resolve, verify, feedback
    one = n.report(gw)
    task = lead(n.issue(one))
    assert n.call("POST", "/v1/tasks/{task_id}/acknowledge", f"/v1/tasks/{task}/acknowledge",
                  headers=roads).status_code == 200
    assert n.call("POST", "/v1/tasks/{task_id}/extension", f"/v1/tasks/{task}/extension", headers=roads,
                  json={"extension": "P5D", "reason": "材料未到"}).status_code == 200
    r = n.call("POST", "/v1/tasks/{task_id}/extension/reject", f"/v1/tasks/{task}/extension/reject",
               headers=district, json={"reason": "时间过长"})
    assert r.status_code == 200, r.text
    assert n.call("POST", "/v1/tasks/{task_id}/extension", f"/v1/tasks/{task}/extension", headers=roads,
                  json={"extension": "P1D", "reason": "材料未到"}).status_code == 200
    # a supervisor over the owner area (the district) decides extensions
    r = n.call("POST", "/v1/tasks/{task_id}/extension/approve", f"/v1/tasks/{task}/extension/approve",
               headers=district)
    assert r.status_code == 200, r.text  # was a 500 under needle up: the router's clocks live in another process
    assert n.call("POST", "/v1/tasks/{task_id}/resolve", f"/v1/tasks/{task}/resolve", headers=roads,
                  json={"note": "已修复"}).status_code == 200
    assert n.call("POST", "/v1/issues/{issue_id}/verify", f"/v1/issues/{one}/verify", headers=gw,
                  json={"passed": True}).status_code == 200
    assert n.call("POST", "/v1/issues/{issue_id}/feedback", f"/v1/issues/{one}/feedback", headers=gw,
                  json={"satisfaction": "satisfied"}).status_code == 200
    # the resident's own 回访 through the one-time link (no login)
    r = n.http.get(f"/v1/issues/{one}/followup", headers=gw)
    assert r.status_code == 200, r.text
    link = r.json()["url"]
    r = n.call("POST", "/f/{issue_id}/{token}", link[link.index("/f/"):],
               json={"solved": True, "satisfaction": "basically_satisfied", "comment": "谢谢"})
    assert r.status_code == 201, r.text

    # a return (退单), an urge and an escalation (逐级反映) on issues of their own
    two = n.report(gw)
    task2 = lead(n.issue(two))
    assert n.call("POST", "/v1/tasks/{task_id}/return", f"/v1/tasks/{task2}/return", headers=roads,
                  json={"reason": "不属本部门"}).status_code == 200
    # 退单审核: the district's command centre refuses it once, then approves it (the rules' next takes it)
    r = n.call("POST", "/v1/tasks/{task_id}/return/reject", f"/v1/tasks/{task2}/return/reject", headers=center,
               json={"reason": "属于本部门职责"})
    assert r.status_code == 200, r.text
    assert n.call("POST", "/v1/tasks/{task_id}/return", f"/v1/tasks/{task2}/return", headers=roads,
                  json={"reason": "确非本部门"}).status_code == 200
    r = n.call("POST", "/v1/tasks/{task_id}/return/approve", f"/v1/tasks/{task2}/return/approve", headers=center,
               json={"reason": "同意退回"})
    assert r.status_code == 200 and r.json()["reassigned_to"], r.text
    # 改派 by a supervisor over the owner area; 缓办 asked, refused, asked again, approved and resumed
    five = n.report(gw)
    task5 = lead(n.issue(five))
    r = n.call("POST", "/v1/tasks/{task_id}/reassign", f"/v1/tasks/{task5}/reassign", headers=district,
               json={"department": "dinghai-center", "reason": "跨部门协调"})
    assert r.status_code == 200, r.text
    task6 = r.json()["reassigned_to"]
    cc = center
    until = {"reason": "等待审批", "until": "2099-01-01T00:00:00+08:00"}
    assert n.call("POST", "/v1/tasks/{task_id}/suspend", f"/v1/tasks/{task6}/suspend", headers=cc,
                  json=until).status_code == 200
    assert n.call("POST", "/v1/tasks/{task_id}/suspend/reject", f"/v1/tasks/{task6}/suspend/reject",
                  headers=district, json={"reason": "不予缓办"}).status_code == 200
    assert n.call("POST", "/v1/tasks/{task_id}/suspend", f"/v1/tasks/{task6}/suspend", headers=cc,
                  json=until).status_code == 200
    assert n.call("POST", "/v1/tasks/{task_id}/suspend/approve", f"/v1/tasks/{task6}/suspend/approve",
                  headers=district).status_code == 200
    assert n.call("POST", "/v1/tasks/{task_id}/resume", f"/v1/tasks/{task6}/resume", headers=cc).status_code == 200
    r = n.call("POST", "/v1/tasks/{task_id}/supervise", f"/v1/tasks/{task6}/supervise", headers=district,
               json={"due": "2099-01-01T00:00:00+08:00", "reason": "督办", "remind_every": "P7D"})
    assert r.status_code == 200, r.text
    r = n.call("POST", "/v1/issues/{issue_id}/comments", f"/v1/issues/{five}/comments", headers=cc,
               json={"text": "已协调施工队", "kind": "progress"})
    assert r.status_code == 201, r.text
    three = n.report(gw)
    n.issue(three)
    assert n.call("POST", "/v1/issues/{issue_id}/urge", f"/v1/issues/{three}/urge", headers=sup,
                  json={"note": "请尽快"}).status_code == 200
    assert n.call("POST", "/v1/issues/{issue_id}/escalate", f"/v1/issues/{three}/escalate", headers=gw,
                  json={"reason": "群众反映强烈"}).status_code == 202
    # a supervisor over the grid publishes the description in anonymous Open311 reads (the title: it has none)
    r = n.call("POST", "/v1/issues/{issue_id}/publication", f"/v1/issues/{three}/publication", headers=sup,
               json={"public": True, "reason": "无个人信息"})
    assert r.status_code == 200 and r.json()["description_public"] is True, r.text
    (public,) = n.http.get(f"/open311/v2/requests/{three}.json").json()
    assert public["description"] == REPORT["title"], public

    # closed at the grid before anything is dispatched: the router child is held (as a router far behind is)
    router = [pid for pid, cmd in _children(n.up.proc.pid).items() if cmd.endswith("run router")]
    assert len(router) == 1, _children(n.up.proc.pid)
    os.kill(router[0], signal.SIGSTOP)
    try:
        four = n.report(gw)
        r = n.call("POST", "/v1/issues/{issue_id}/resolve-on-site", f"/v1/issues/{four}/resolve-on-site",
                   headers=gw, json={"note": "当场劝离"})
        assert r.status_code == 200, r.text
    finally:
        os.kill(router[0], signal.SIGCONT)
    assert n.issue(four, lambda b: b["status"] == "closed")["tasks"] == []

    # a photo (before), a report that carries it; the triage decisions of the command centre on fresh reports
    png = _png()
    r = n.call("POST", "/v1/media", headers=gw | {"Content-Type": "image/png"}, content=png)
    assert r.status_code == 201, r.text
    n.report(gw, media=[{"id": r.json()["id"], "phase": "before"}])
    center = n.auth("handler", "dept:dinghai-center")  # road damage is owned at the district
    for action, body in (("accept", {}), ("reject", {"reason": "不属政府职责"}), ("void", {"reason": "测试"}),
                         ("recategorise", {"category": "neighbour_dispute", "reason": "实为邻里纠纷"})):
        issue_id = n.report(gw)
        n.issue(issue_id)
        r = n.call("POST", f"/v1/issues/{{issue_id}}/{action}", f"/v1/issues/{issue_id}/{action}", headers=center,
                   json=body)
        assert r.status_code == 200, (action, r.text)
    target, duplicate = n.report(gw), n.report(gw)  # 合并办理: a duplicate merged into an open issue
    n.issue(duplicate)
    r = n.call("POST", "/v1/issues/{issue_id}/merge", f"/v1/issues/{duplicate}/merge", headers=center,
               json={"into": target, "reason": "同一处"})
    assert r.status_code == 200, r.text

    # a household visit (走访) by the grid's worker, and the report raised on it
    r = n.call("POST", "/v1/visits", headers=gw | {"Idempotency-Key": str(uuid.uuid4())},
               json={"grid": GRID, "household": "五星路3号", "kind": "routine", "note": "路面塌陷"})
    assert r.status_code == 201, r.text
    n.report(gw, visit=r.json()["id"])

    # a campaign, a resident forgotten, an Open311 request
    assert n.call("POST", "/v1/campaigns", headers=sup,
                  json={"area": "wuxing", "category": "road_damage", "title": "e2e campaign"}).status_code == 202
    assert n.call("DELETE", "/v1/residents/{resident_id}", "/v1/residents/r-0123456789abcdef",
                  headers=admin).status_code == 204
    gw_key = dict(gw)["Authorization"].removeprefix("Bearer ")
    r = n.call("POST", "/open311/v2/requests.{fmt}", "/open311/v2/requests.json",
               data={"service_code": "road_damage", "description": "路灯不亮", "attribute[grid]": GRID,
                     "api_key": gw_key})
    assert r.status_code == 201, r.text

    # an integrator's webhook: registered, its dead letters replayed, removed
    integrator = n.auth("integrator")
    r = n.call("POST", "/v1/webhooks", headers=integrator, json={
        "url": "http://127.0.0.1:9/hook", "types": ["issue_reported"], "secret": "e2e-secret-0123456789"})
    assert r.status_code == 201, r.text
    hook = r.json()["id"]
    assert n.call("POST", "/v1/webhooks/{hook_id}/dead-letters/replay", f"/v1/webhooks/{hook}/dead-letters/replay",
                  headers=integrator).status_code == 200
    assert n.call("DELETE", "/v1/webhooks/{hook_id}", f"/v1/webhooks/{hook}", headers=integrator).status_code == 204

    missing = sorted(set(n.documented) - set(n.seen))
    assert not missing, f"write endpoints this suite never drove (add a step): {missing}"
    wrong = {route: (n.seen[route], code) for route, code in n.documented.items() if n.seen[route] != code}
    assert not wrong, f"(answered, documented): {wrong}"


def test_the_router_child_resumes_after_the_hold(needle: Needle) -> None:
    """The SIGSTOP above left nothing behind: the report made while the router was held got its tasks."""
    gw = needle.auth("grid_worker", f"area:{GRID}")
    issue = needle.issue(needle.report(gw))  # waits (bounded) for the router's dispatch
    assert any(t["role"] == "lead" for t in issue["tasks"]), issue
