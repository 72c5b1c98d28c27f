"""Operations from the command line, as real processes: JSON logs of the router process carry the
request's trace id and the issue id; ``needle backup`` snapshots a running needle; (slow) ``needle
restore`` brings a ``needle up``'s backup into a fresh data dir that ``needle up`` then serves, and a
stopped data dir is backed up through embedded servers started for the command."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.entrypoints.processes import free_port
from shared import auth

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
NEEDLE = Path(sys.executable).parent / "needle"
TRACE = "0af7651916cd43dd8448eb211c80319c"


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("NEEDLE_")}
    return {**e, "NEEDLE_LOG_JSON": "1", "NEEDLE_ORG": str(FIXTURES / "contract_org.yaml"),
            "NEEDLE_RULES": str(FIXTURES / "contract_rules.yaml")}


class Up:
    def __init__(self, data: Path) -> None:
        self.data, self.port = data, free_port()
        data.mkdir(parents=True, exist_ok=True)
        self.out = open(data.parent / f"{data.name}-up.out", "wb")
        self.proc = subprocess.Popen([str(NEEDLE), "up", "--data-dir", str(data), "--port", str(self.port)],
                                     stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env())
        deadline = time.monotonic() + 90
        while b"needle ready" not in Path(self.out.name).read_bytes():
            assert self.proc.poll() is None, Path(self.out.name).read_text()[-3000:]
            assert time.monotonic() < deadline, "needle up not ready"
            time.sleep(0.1)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=15)

    def token(self, role: str, scope: str = "") -> dict[str, str]:
        key = auth.load_or_create_key(self.data)
        return {"Authorization": f"Bearer {auth.issue_token(key, role=role, scope=scope)}"}

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.out.close()


def needle(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NEEDLE), *args], capture_output=True, text=True, env=env(), timeout=timeout)


def wait(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


async def test_router_child_logs_the_requests_trace_id_and_backup_cli_snapshots_its_streams(
        needle_factory: Any, nats_factory: Any, tmp_path: Path) -> None:
    """``needle run router`` as its own process with JSON logs (as ``needle up`` runs it), the HTTP
    intake in this process: the router's line for a report carries the request's trace id and the
    issue id. Then ``needle backup`` attaches to the same NATS (NEEDLE_NATS_URL) and snapshots it."""
    server = nats_factory()
    h = await needle_factory(nats_url=server.url, services=("intake", "projections"))
    log = tmp_path / "router.log"
    secrets_dir = tmp_path / "router" / "secrets"  # every process of one needle reads the same KEK
    secrets_dir.mkdir(parents=True, mode=0o700)
    shutil.copy2(h.stack.settings.data_dir / "secrets" / "resident-kek.key", secrets_dir / "resident-kek.key")
    with open(log, "wb") as out:
        router = await asyncio.create_subprocess_exec(
            str(NEEDLE), "run", "router", "--data-dir", str(tmp_path / "router"), stdout=out, stderr=out,
            env={**env(), "NEEDLE_NATS_URL": server.url})
    try:
        for _ in range(600):
            if b"needle ready" in log.read_bytes():
                break
            assert router.returncode is None, log.read_text()[-2000:]
            await asyncio.sleep(0.05)
        r = await h.client.post("/v1/issues", headers={**h.auth("grid_worker", "area:wuxing-g1"),
                                                       "traceparent": f"00-{TRACE}-b7ad6b7169203331-01"},
                                json={"grid": "wuxing-g1", "category": "road_damage", "title": "trace me"})
        assert r.status_code == 201, r.text
        issue_id = r.json()["id"]

        def line() -> dict[str, Any] | None:
            for raw in log.read_text().splitlines():
                if raw.startswith("{"):
                    rec = json.loads(raw)
                    if rec.get("event") == "reacted" and rec.get("issue") == issue_id:
                        return dict(rec)
            return None

        rec = None
        for _ in range(300):
            rec = line()
            if rec:
                break
            await asyncio.sleep(0.05)
        assert rec is not None, log.read_text()[-2000:]
        assert rec["trace_id"] == TRACE and rec["level"] == "info" and rec["cue"] == "issue_reported"
        assert "issue_routed" in rec["events"] and "timestamp" in rec

        target = tmp_path / "bk"
        cli = {**env(), "NEEDLE_NATS_URL": server.url}
        proc = await asyncio.create_subprocess_exec(str(NEEDLE), "backup", str(target), "--data-dir",
                                                    str(tmp_path / "cli"), env=cli, stdout=PIPE, stderr=PIPE)
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert b"NEEDLE_EVENTS:" in stdout and f"backup written to {target}".encode() in stdout
        manifest = json.loads((target / "backup.json").read_text())
        ev = manifest["streams"][0]
        assert ev["name"] == "NEEDLE_EVENTS" and ev["state"]["messages"] >= 4
        assert (target / ev["file"]).stat().st_size == ev["size"]
    finally:
        if router.returncode is None:
            router.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(router.wait(), 20)
            except TimeoutError:
                router.kill()
                await router.wait()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A ``needle up`` with JSON logs and one report sent with a W3C traceparent (slow tests only)."""
    data = tmp_path_factory.mktemp("ops") / "data"
    up = Up(data)
    try:
        r = up.client.post("/v1/issues", headers={**up.token("grid_worker", "area:wuxing-g1"),
                                                  "traceparent": f"00-{TRACE}-b7ad6b7169203331-01"},
                           json={"grid": "wuxing-g1", "category": "road_damage", "title": "trace me"})
        assert r.status_code == 201, r.text
        issue_id = r.json()["id"]
        sup = up.token("supervisor", "area:city")
        assert wait(lambda: up.client.get(f"/v1/issues/{issue_id}", headers=sup).json().get("status")
                    == "dispatched")
        yield {"up": up, "data": data, "issue": issue_id}
    finally:
        up.stop()


@pytest.mark.slow
def test_restore_cli_into_a_fresh_data_dir_serves_the_same_issues(running: dict[str, Any], tmp_path: Path) -> None:
    up: Up = running["up"]
    sup = up.token("supervisor", "area:city")
    target = tmp_path / "bk"
    assert needle("backup", str(target), "--data-dir", str(running["data"])).returncode == 0
    before = up.client.get("/v1/issues?limit=100", headers=sup).json()

    fresh = tmp_path / "fresh"
    r = needle("restore", str(target), "--data-dir", str(fresh))  # without the KEK kept apart: refused, untouched
    assert r.returncode == 2 and "key-encryption key" in r.stderr and "resident-kek.key" in r.stderr, r.stderr
    assert not (fresh / "nats").exists() or not any((fresh / "nats").iterdir())
    (fresh / "secrets").mkdir(parents=True, mode=0o700, exist_ok=True)
    shutil.copy2(running["data"] / "secrets" / "resident-kek.key", fresh / "secrets" / "resident-kek.key")
    r = needle("restore", str(target), "--data-dir", str(fresh))
    assert r.returncode == 0, r.stderr
    assert "read models rebuilt" in r.stdout
    again = needle("restore", str(target), "--data-dir", str(fresh))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr

    restored = Up(fresh)
    try:
        after = restored.client.get("/v1/issues?limit=100", headers=restored.token("supervisor", "area:city")).json()
        assert after == before
        evs = restored.client.get(f"/v1/issues/{running['issue']}/events", headers=restored.token("admin")).json()
        assert [e["correlationid"] for e in evs] == [TRACE] * len(evs)
    finally:
        restored.stop()
    # a stopped data dir is backed up through an embedded nats-server started for the command
    r = needle("backup", str(tmp_path / "bk2"), "--data-dir", str(fresh))
    assert r.returncode == 0, r.stderr
    first = json.loads((target / "backup.json").read_text())["streams"][0]["state"]
    second = json.loads((tmp_path / "bk2" / "backup.json").read_text())["streams"][0]["state"]
    assert second["last_seq"] >= first["last_seq"] and second["first_seq"] == 1
