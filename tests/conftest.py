"""Fixtures: real nats-server (JetStream) and real Postgres, started from the bundled binaries.

* ``pg_url``: one Postgres for the session; each needle stack gets a fresh database.
* ``nats_factory``: a fresh nats-server per stack (starts in ~0.1 s), so tests never share streams.
* ``needle_factory``: a whole needle (intake over real HTTP on a free port, router, projections) in
  this event loop, on a given org/rulebook; ``needle`` is one on the contract-check org and rules.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import NeedleHandle, start_needle

FIXTURES = Path(__file__).parent / "fixtures"
_db_ids = itertools.count()


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("NEEDLE_TEST_DATABASE_URL"):
        yield os.environ["NEEDLE_TEST_DATABASE_URL"]
        return
    from services.entrypoints.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
    pg.start()
    try:
        yield pg.url
    finally:
        pg.stop()


@pytest.fixture
def nats_factory(tmp_path: Path) -> Iterator[Callable[[], Any]]:
    from services.entrypoints.embedded import EmbeddedNats

    servers: list[EmbeddedNats] = []

    def make(port: int = 0) -> EmbeddedNats:
        n = EmbeddedNats(tmp_path / f"nats{len(servers)}", port=port)
        n.start()
        servers.append(n)
        return n

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
async def needle_factory(tmp_path: Path, nats_factory: Callable[[], Any], pg_url: str
                         ) -> AsyncIterator[Callable[..., Any]]:
    handles: list[NeedleHandle] = []

    async def make(org: Path = FIXTURES / "contract_org.yaml", rules: Path = FIXTURES / "contract_rules.yaml",
                   *, nats_url: str | None = None, services: tuple[str, ...] = ("intake", "router", "projections"),
                   database: str | None = None, **settings: Any) -> NeedleHandle:
        url = nats_url or nats_factory().url
        db = database or f"needle_test_{os.getpid()}_{next(_db_ids)}"
        h = await start_needle(tmp_path / f"needle{len(handles)}", org=org, rules=rules, nats_url=url,
                               pg_admin_url=pg_url, database=db, services=services, **settings)
        handles.append(h)
        return h

    yield make
    for h in handles:
        with contextlib.suppress(Exception):
            await h.close()


@pytest.fixture
async def needle(needle_factory: Callable[..., Any]) -> NeedleHandle:
    h: NeedleHandle = await needle_factory()
    return h
