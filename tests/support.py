"""Test support: a whole needle stack in the test's event loop, reached over real HTTP."""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvicorn

from services.entrypoints.processes import free_port
from services.entrypoints.stack import Stack, Urls, http_config
from shared import auth
from shared.settings import Settings


@dataclass
class NeedleHandle:
    stack: Stack
    base_url: str
    client: httpx.AsyncClient
    server: uvicorn.Server | None = None
    server_task: asyncio.Task[Any] | None = None
    _tokens: dict[tuple[str, str], str] = field(default_factory=dict)

    def token(self, role: str, scope: str = "", subject: str | None = None) -> str:
        key = (role, scope + (subject or ""))
        if key not in self._tokens:
            k = auth.load_or_create_key(self.stack.settings.data_dir)
            self._tokens[key] = auth.issue_token(k, role=role, scope=scope, subject=subject)
        return self._tokens[key]

    def auth(self, role: str, scope: str = "", subject: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, scope, subject)}"}

    async def wait_for(self, path: str, headers: dict[str, str], predicate: Any, timeout: float = 10.0) -> Any:
        """Poll GET ``path`` until ``predicate(json)`` holds; returns the last body."""
        deadline = asyncio.get_running_loop().time() + timeout
        body: Any = None
        while asyncio.get_running_loop().time() < deadline:
            r = await self.client.get(path, headers=headers)
            if r.status_code == 200:
                body = r.json()
                if predicate(body):
                    return body
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting on {path}; last body: {body}")

    async def close(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.server_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server_task, 10)
        await self.client.aclose()
        await self.stack.close()


# -- small helpers of the integration tests that drive issues over HTTP --------------------------------------------
def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def now() -> datetime:
    return datetime.now(UTC)


async def sleep_until(at: datetime) -> None:
    delay = (at - now()).total_seconds()
    if delay > 0:
        await asyncio.sleep(delay)


async def report(h: NeedleHandle, category: str, grid: str = "wuxing-g1") -> str:
    r = await h.client.post("/v1/issues", headers=h.auth("grid_worker", f"area:{grid}"),
                            json={"grid": grid, "category": category, "title": f"{category} test"})
    assert r.status_code == 201, r.text
    issue_id: str = r.json()["id"]
    return issue_id


async def issue(h: NeedleHandle, issue_id: str) -> dict[str, Any]:
    r = await h.client.get(f"/v1/issues/{issue_id}", headers=h.auth("admin"))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def events(h: NeedleHandle, issue_id: str) -> list[dict[str, Any]]:
    r = await h.client.get(f"/v1/issues/{issue_id}/events", headers=h.auth("admin"))
    assert r.status_code == 200, r.text
    body: list[dict[str, Any]] = r.json()
    return body


def of_type(evs: list[dict[str, Any]], ce_type: str, **data: Any) -> list[dict[str, Any]]:
    return [e for e in evs if e["type"] == ce_type and all(e["data"].get(k) == v for k, v in data.items())]


async def ensure_database(pg_admin_url: str, database: str) -> str:
    conn = await asyncpg.connect(pg_admin_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    return pg_admin_url.rsplit("/", 1)[0] + f"/{database}"


_KEKS: dict[str, str] = {}


def share_kek(data_dir: Path, nats_url: str) -> None:
    """Every process of one needle reads the same key-encryption key (its data dir's, or in compose a shared
    volume): the stacks a test starts on one NATS share one, as the processes of ``needle up`` do."""
    secrets_dir = data_dir / "secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    kek = secrets_dir / "resident-kek.key"
    if not kek.exists():  # created 0600 from its first byte, as needle creates it
        fd = os.open(kek, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_KEKS.setdefault(nats_url, secrets.token_hex(32)))


def restored_kek(nats_url: str, from_data_dir: Path) -> None:
    """The needles started on ``nats_url`` read the key-encryption key of ``from_data_dir``: a restore brings
    the KEK kept apart from the backup (docs/SECURITY.md), else the restored keys open with nothing."""
    _KEKS[nats_url] = (from_data_dir / "secrets" / "resident-kek.key").read_text().strip()


async def start_needle(data_dir: Path, *, org: Path, rules: Path, nats_url: str, pg_admin_url: str, database: str,
                       services: tuple[str, ...] = ("intake", "router", "projections"), read_api: bool = False,
                       **overrides: Any) -> NeedleHandle:
    """``read_api``: without the projection worker in this process, serve the read models another process keeps
    (the checkpoint follower), as ``needle up``'s intake does."""
    db_url = await ensure_database(pg_admin_url, database)
    data_dir.mkdir(parents=True, exist_ok=True)
    if not overrides.get("kek_command"):  # a KEK from a KMS command: no file at all
        share_kek(data_dir, nats_url)
    settings = Settings(data_dir=data_dir, org=org, rules=rules, nats_url=nats_url, database_url=db_url,
                        port=free_port(), **overrides)
    stack = Stack.from_settings(settings, Urls(nats=nats_url, database=db_url))
    await stack.connect()
    await stack.start(services, read_api=read_api)
    base = f"http://127.0.0.1:{settings.port}"
    server = task = None
    if "intake" in services:
        config = http_config(stack.build_app(), "127.0.0.1", settings.port)  # as needle serves it
        server = uvicorn.Server(config)
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
    client = httpx.AsyncClient(base_url=base, timeout=15)
    return NeedleHandle(stack=stack, base_url=base, client=client, server=server, server_task=task)


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@contextlib.asynccontextmanager
async def module_needle(root: Path, pg_admin_url: str, name: str, *, org: Path = FIXTURES / "contract_org.yaml",
                        rules: Path = FIXTURES / "contract_rules.yaml", **settings: Any) -> AsyncIterator[NeedleHandle]:
    """A needle on a nats-server of its own under ``root`` and a fresh database ``needle_<name>_...``, for a
    module's tests to share (a module-scoped fixture: ``async with module_needle(...) as h: yield h``)."""
    from services.entrypoints.embedded import EmbeddedNats

    server = EmbeddedNats(root / "nats-data")
    server.start()
    try:
        handle = await start_needle(root / "needle", org=org, rules=rules, nats_url=server.url,
                                    pg_admin_url=pg_admin_url,
                                    database=f"needle_{name}_{os.getpid()}_{uuid.uuid4().hex[:8]}", **settings)
        try:
            yield handle
        finally:
            with contextlib.suppress(Exception):
                await handle.close()
    finally:
        server.stop()
