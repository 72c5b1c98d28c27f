"""Security over real HTTP, NATS and Postgres: revoked tokens (``needle token revoke`` through the
NEEDLE_REVOKED bucket, in every intake and across restarts), per-token rate limits (429 +
Retry-After), CORS preflight and the security headers."""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from services.entrypoints import cli
from services.entrypoints.datadir import hold
from shared import auth
from tests.support import NeedleHandle, module_needle, start_needle

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PROBLEM = "application/problem+json"
ROAD = {"grid": "wuxing-g1", "category": "road_damage", "title": "pothole"}
ORIGIN = "https://ops.example.org"


@pytest.fixture(scope="module")
async def h(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> AsyncIterator[NeedleHandle]:
    """One intake with tight per-token limits (each test uses its own subjects) and one CORS origin."""
    async with module_needle(tmp_path_factory.mktemp("security"), pg_url, "security", services=("intake",),
                             rate_limit_per_s=1.0, rate_limit_burst=3, rate_limit_read_per_s=2.0,
                             rate_limit_read_burst=5, cors_origins=[ORIGIN],
                             webhook_allow_private=["127.0.0.1"]) as handle:
        yield handle


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token(h: NeedleHandle, role: str = "grid_worker", scope: str = "area:wuxing-g1", subject: str | None = None,
          now: float | None = None) -> str:
    key = auth.load_or_create_key(h.stack.settings.data_dir)
    return auth.issue_token(key, role=role, scope=scope, subject=subject or f"s-{uuid.uuid4().hex[:8]}", now=now)


async def revoke(h: NeedleHandle, *args: str) -> str:
    """``needle token revoke ARGS`` as a user runs it: the CLI finds NATS through DIR/runtime.json."""
    s = h.stack.settings
    with hold(s.data_dir):  # this test's stack serves the data dir, as `needle up` would
        cli.write_runtime(s, h.stack.urls.nats, h.stack.urls.database, ("intake",))
        result = await asyncio.to_thread(CliRunner().invoke, cli.app,
                                         ["token", "revoke", *args, "--data-dir", str(s.data_dir)])
    assert result.exit_code == 0, result.output
    return str(result.output)


async def whoami(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    """A cheap authenticated read (no read models): an issue that does not exist, 404 once authenticated."""
    return await client.get("/v1/issues/0123456789abcdefghjkmnpqrs", headers=headers)


# -- revocation ---------------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def another_intake(h: NeedleHandle, data_dir: Path, pg_url: str) -> AsyncIterator[NeedleHandle]:
    """A second intake on ``h``'s NATS with the same token key (another needle process's worth)."""
    key = auth.key_path(data_dir)
    key.parent.mkdir(parents=True)
    key.write_bytes(auth.load_or_create_key(h.stack.settings.data_dir))
    other = await start_needle(data_dir, org=FIXTURES / "contract_org.yaml", rules=FIXTURES / "contract_rules.yaml",
                               nats_url=h.stack.urls.nats, pg_admin_url=pg_url, services=("intake",),
                               database=f"needle_security_{os.getpid()}_{uuid.uuid4().hex[:8]}")
    try:
        yield other
    finally:
        await other.close()


async def test_a_revoked_token_is_401_in_every_intake_and_after_a_restart(h: NeedleHandle, tmp_path: Path,
                                                                          pg_url: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await check_revocation_everywhere(h, await stack.enter_async_context(another_intake(h, tmp_path / "b", pg_url)),
                                          lambda: stack.enter_async_context(another_intake(h, tmp_path / "c", pg_url)))


async def check_revocation_everywhere(h: NeedleHandle, other: NeedleHandle, start_late: Callable[[], Any]) -> None:
    # given two intakes on the same NATS and a token both accept
    victim, sibling = token(h, subject="gw-victim"), token(h, subject="gw-victim")
    for c in (h.client, other.client):
        assert (await whoami(c, bearer(victim))).status_code == 404  # authenticated: the issue does not exist
    # when it is revoked with the CLI, by its jti
    jti = auth.TokenVerifier(auth.load_or_create_key(h.stack.settings.data_dir)).verify(victim).token_id
    assert "revoked token" in await revoke(h, jti)
    # then both refuse it: 401 problem "token revoked", well within a few seconds (about one, unloaded)
    t0 = time.monotonic()
    for c in (h.client, other.client):
        while (r := await whoami(c, bearer(victim))).status_code != 401:
            assert time.monotonic() - t0 < 5, "a revoked token was still accepted"
            await asyncio.sleep(0.02)
        assert r.headers["content-type"] == PROBLEM and r.json()["detail"] == "token revoked"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await whoami(c, bearer(sibling))).status_code == 404  # another token of the subject: untouched
    # and an intake started afterwards refuses it from its first request
    late: NeedleHandle = await start_late()
    assert (await whoami(late.client, bearer(victim))).status_code == 401
    assert (await whoami(late.client, bearer(sibling))).status_code == 404


async def test_revoking_a_subject_refuses_its_earlier_tokens_not_later_ones(h: NeedleHandle) -> None:
    subject = f"张三-{uuid.uuid4().hex[:6]}"
    first, second = token(h, subject=subject), token(h, subject=subject, now=time.time() - 3600)
    bystander = token(h)
    for t in (first, second, bystander):
        assert (await whoami(h.client, bearer(t))).status_code == 404
    out = await revoke(h, "--subject", subject)
    assert subject in out
    t0 = time.monotonic()
    for t in (first, second):
        while (await whoami(h.client, bearer(t))).status_code != 401:
            assert time.monotonic() - t0 < 5
            await asyncio.sleep(0.02)
    assert (await whoami(h.client, bearer(bystander))).status_code == 404
    newer = token(h, subject=subject, now=time.time() + 2)  # issued after the revocation's second
    assert (await whoami(h.client, bearer(newer))).status_code == 404


async def test_revoke_accepts_the_token_itself_and_refuses_bad_input(h: NeedleHandle) -> None:
    t = token(h)
    await revoke(h, t)
    t0 = time.monotonic()
    while (await whoami(h.client, bearer(t))).status_code != 401:
        assert time.monotonic() - t0 < 5
        await asyncio.sleep(0.02)
    runner = CliRunner()
    data = ["--data-dir", str(h.stack.settings.data_dir)]
    for args in (["token", "revoke", *data], ["token", "revoke", "abc", "--subject", "x", *data],
                 ["token", "revoke", "not a jti", *data], ["token", "revoke", "--subject", " ", *data]):
        r = await asyncio.to_thread(runner.invoke, cli.app, args)
        assert r.exit_code == 2 and "needle:" in r.output, (args, r.output)


async def test_revoke_without_a_running_needle_says_so(tmp_path: Path) -> None:
    r = await asyncio.to_thread(CliRunner().invoke, cli.app, ["token", "revoke", "abc", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and "no running needle" in r.output


# -- rate limits --------------------------------------------------------------------------------------------------
async def test_writes_past_the_burst_are_429_with_retry_after_and_reads_count_apart(h: NeedleHandle) -> None:
    t = bearer(token(h))
    statuses = [(await h.client.post("/v1/issues", json=ROAD, headers=t)).status_code for _ in range(4)]
    assert statuses[:3] == [201, 201, 201], statuses  # the burst (3)
    r = await h.client.post("/v1/issues", json=ROAD, headers=t)
    assert r.status_code == 429 and r.headers["content-type"] == PROBLEM, r.text
    assert int(r.headers["Retry-After"]) >= 1 and r.json()["retry_after"] == int(r.headers["Retry-After"])
    assert "writes" in r.json()["detail"]
    # reads have their own bucket; another subject has its own too
    assert (await whoami(h.client, t)).status_code == 404
    assert (await h.client.post("/v1/issues", json=ROAD, headers=bearer(token(h)))).status_code == 201
    # a token's bucket refills at its rate (1/s here): after Retry-After the write goes through
    await asyncio.sleep(int(r.headers["Retry-After"]))
    assert (await h.client.post("/v1/issues", json=ROAD, headers=t)).status_code == 201


async def test_reads_past_their_burst_are_429(h: NeedleHandle) -> None:
    t = bearer(token(h))
    statuses = [(await whoami(h.client, t)).status_code for _ in range(8)]
    assert statuses[:5] == [404] * 5 and 429 in statuses[5:], statuses


async def test_the_limit_is_per_subject_not_per_token(h: NeedleHandle) -> None:
    subject = f"one-person-{uuid.uuid4().hex[:6]}"
    tokens = [bearer(token(h, subject=subject)) for _ in range(6)]
    statuses = [(await whoami(h.client, t)).status_code for t in tokens]
    assert 429 in statuses, statuses  # six fresh tokens do not buy six bursts


async def test_open311_submissions_are_limited_in_its_own_error_form(h: NeedleHandle) -> None:
    key = token(h, role="grid_worker", scope="area:wuxing-g1")
    form = {"service_code": "road_damage", "description": "pothole", "lat": "30.0", "long": "122.1",
            "api_key": key, "attribute[grid]": "wuxing-g1"}
    rs = [await h.client.post("/open311/v2/requests.json", data=form) for _ in range(5)]
    limited = [r for r in rs if r.status_code == 429]
    assert limited, [(r.status_code, r.text[:200]) for r in rs]
    assert limited[0].json()[0]["code"] == 429 and int(limited[0].headers["Retry-After"]) >= 1


# -- CORS and headers ---------------------------------------------------------------------------------------------
async def test_cors_preflight_allows_the_configured_origin_only(h: NeedleHandle) -> None:
    ask = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"}
    ok = await h.client.options("/v1/issues", headers={"Origin": ORIGIN} | ask)
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "idempotency-key" in ok.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in ok.headers  # bearer tokens, never cookies
    bad = await h.client.options("/v1/issues", headers={"Origin": "https://evil.example"} | ask)
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    # a simple request: the allowed origin may read the answer and needle's own headers
    r = await h.client.post("/v1/issues", json=ROAD, headers=bearer(token(h)) | {"Origin": ORIGIN})
    assert r.status_code == 201 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "needle-seq" in r.headers["access-control-expose-headers"].lower()
    r = await h.client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


async def test_security_headers_on_api_answers_and_errors(h: NeedleHandle) -> None:
    t = bearer(token(h))
    for r in (await whoami(h.client, t), await h.client.get("/healthz"), await h.client.get("/v1/issues/x"),
              await h.client.post("/v1/issues", content=b"x" * (h.stack.settings.max_body_bytes + 1))):
        assert r.headers["x-content-type-options"] == "nosniff", r.url
        assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert "server" not in r.headers  # no software name and version for an attacker to look up
    assert (await whoami(h.client, t)).headers["cache-control"] == "no-store"  # personal data: no shared cache
    schemas = await h.client.get("/v1/schemas")
    assert schemas.headers["cache-control"].startswith("public")  # a route's own caching is kept


# -- audit of writes that are not issue events --------------------------------------------------------------------
async def test_webhook_changes_are_audit_log_lines_naming_the_caller(h: NeedleHandle) -> None:
    from structlog.testing import capture_logs

    who = f"integrator-{uuid.uuid4().hex[:6]}"
    t = bearer(token(h, role="integrator", scope="", subject=who))
    with capture_logs() as logs:
        r = await h.client.post("/v1/webhooks", headers=t, json={
            "url": "http://127.0.0.1:9/hook", "types": ["issue_reported"], "secret": "audit-secret-0123456789"})
        assert r.status_code == 201, r.text
        hook = r.json()["id"]
        assert (await h.client.post(f"/v1/webhooks/{hook}/dead-letters/replay", headers=t)).status_code == 200
        assert (await h.client.delete(f"/v1/webhooks/{hook}", headers=t)).status_code == 204
    lines = [(e["event"], e["actor"], e["webhook"]) for e in logs if e.get("webhook") == hook]
    assert lines == [("webhook registered", who, hook), ("webhook dead letters replayed", who, hook),
                     ("webhook deleted", who, hook)], logs


async def test_an_open_event_stream_ends_when_its_token_is_revoked(h: NeedleHandle,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from services.intake import events_api

    monkeypatch.setattr(events_api, "_IDLE_CHECK_S", 0.2)  # an idle stream looks at its token this often
    t = token(h, role="integrator", scope="")
    jti = auth.TokenVerifier(auth.load_or_create_key(h.stack.settings.data_dir)).verify(t).token_id
    async with asyncio.timeout(20), h.client.stream("GET", "/v1/events/stream", params={"live": "true"},
                                                    headers=bearer(t)) as r:
        assert r.status_code == 200
        await revoke(h, jti)
        t0 = time.monotonic()
        async for _ in r.aiter_bytes():  # pings or events until the server ends the stream
            pass
        assert time.monotonic() - t0 < 10
    assert (await h.client.get("/v1/events/stream", headers=bearer(t))).status_code == 401
