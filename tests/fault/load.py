"""The load of the fault suite: keyed reports at a steady rate and an acknowledgement of each
issue's lead task, like real clients: a 503, a dropped connection or a timeout is retried with
the same Idempotency-Key (a report) or against the current state (an acknowledgement) until it
gets a definite answer. Only definite answers are written in the ledger: those are the writes
that must be in the stream exactly once."""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

GRID, CATEGORY = "wuxing-g1", "road_damage"
RETRYABLE = {502, 503, 504}  # and 429 (rate limited), waited out as its Retry-After says
GIVE_UP_S = 180.0


@dataclass
class Ledger:
    reports: dict[str, str] = field(default_factory=dict)  # Idempotency-Key -> issue id (201)
    acks: dict[str, str] = field(default_factory=dict)  # task id -> issue id (200, or our own earlier try landed)
    retries: Counter[str] = field(default_factory=Counter)  # why a request was tried again
    failures: list[str] = field(default_factory=list)  # answers that are wrong (a 500, an unexpected 4xx)
    gave_up: int = 0
    mismatched_ids: int = 0  # a retried key that came back with another issue id

    def snapshot(self) -> tuple[int, int]:
        return len(self.reports), len(self.acks)


class Load:
    def __init__(self, base_url: str, tokens: dict[str, str], ledger: Ledger, *, rate: float,
                 handler_token: Any) -> None:
        self.base_url, self.tokens, self.ledger, self.rate = base_url, tokens, ledger, rate
        self.handler_token = handler_token  # department -> bearer token
        self.client = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(15.0, connect=3.0),
                                        limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
        self.inflight: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    # -- driving -------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._runner = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop issuing new reports; let every request in flight reach a definite answer."""
        self._stop.set()
        if self._runner is not None:
            await self._runner
        while self.inflight:
            await asyncio.gather(*list(self.inflight), return_exceptions=True)

    async def close(self) -> None:
        await self.client.aclose()

    async def _run(self) -> None:
        period = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            if len(self.inflight) < 400:  # a client pool, not an unbounded queue, while a part is down
                t = asyncio.create_task(self._report_and_ack())
                self.inflight.add(t)
                t.add_done_callback(self.inflight.discard)
            next_at += period
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - time.monotonic()))

    # -- one client's story --------------------------------------------------------------------
    async def _report_and_ack(self) -> None:
        issue_id = await self._report()
        if issue_id is not None:
            await self._acknowledge_lead(issue_id)

    async def _send(self, method: str, path: str, *, token: str, body: Any = None,
                    headers: dict[str, str] | None = None) -> httpx.Response | None:
        """One attempt: the response, or None when the request may or may not have been executed."""
        try:
            return await self.client.request(method, path, json=body,
                                             headers={"Authorization": f"Bearer {token}", **(headers or {})})
        except httpx.TransportError as exc:
            self.ledger.retries[type(exc).__name__] += 1
            return None

    async def _report(self) -> str | None:
        key = f"fault-{uuid.uuid4().hex}"
        body = {"grid": GRID, "category": CATEGORY, "title": "fault suite report"}
        deadline = time.monotonic() + GIVE_UP_S
        while time.monotonic() < deadline:
            r = await self._send("POST", "/v1/issues", token=self.tokens["grid_worker"], body=body,
                                 headers={"Idempotency-Key": key})
            if r is not None and r.status_code == 201:
                issue_id: str = r.json()["id"]
                if key in self.ledger.reports and self.ledger.reports[key] != issue_id:
                    self.ledger.mismatched_ids += 1
                self.ledger.reports[key] = issue_id
                return issue_id
            if r is not None and not self._retryable(r):
                self.ledger.failures.append(f"POST /v1/issues -> {r.status_code} {r.text[:200]}")
                return None
            await asyncio.sleep(_backoff(r))
        self.ledger.gave_up += 1
        return None

    def _retryable(self, r: httpx.Response) -> bool:
        if r.status_code in RETRYABLE or r.status_code == 429:  # 429: the per-token rate limit, after a storm
            self.ledger.retries[str(r.status_code)] += 1
            return True
        if r.status_code == 409 and r.json().get("title") == "Concurrent update":  # ConcurrencyConflict: retryable
            self.ledger.retries["409 concurrent"] += 1
            return True
        return False

    async def _lead_task(self, issue_id: str, deadline: float) -> dict[str, Any] | None:
        """Wait until the router has dispatched the issue (read from the stream, not a read model)."""
        while time.monotonic() < deadline:
            r = await self._send("GET", f"/v1/issues/{issue_id}", token=self.tokens["admin"])
            if r is not None and r.status_code == 200:
                leads = [t for t in r.json().get("tasks", []) if t["role"] == "lead"]
                if leads:
                    return leads[0]
            elif r is not None and r.status_code not in (404, 429, *RETRYABLE):  # 404: a replica not caught up
                self.ledger.failures.append(f"GET /v1/issues/{issue_id} -> {r.status_code} {r.text[:200]}")
                return None
            await asyncio.sleep(0.3)
        return None

    async def _acknowledge_lead(self, issue_id: str) -> None:
        deadline = time.monotonic() + GIVE_UP_S
        task = await self._lead_task(issue_id, deadline)
        if task is None:
            self.ledger.gave_up += 1
            return
        token = self.handler_token(task["department"])
        tried = False  # an earlier attempt got no definite answer: it may have landed
        while time.monotonic() < deadline:
            r = await self._send("POST", f"/v1/tasks/{task['id']}/acknowledge", token=token)
            if r is not None and r.status_code == 200:
                self.ledger.acks[task["id"]] = issue_id
                return
            if (r is not None and r.status_code == 409 and tried
                    and r.json().get("current_status") == "acknowledged"):
                self.ledger.acks[task["id"]] = issue_id  # our own earlier try was stored
                return
            if r is not None and not self._retryable(r):
                self.ledger.failures.append(f"acknowledge {task['id']} -> {r.status_code} {r.text[:200]}")
                return
            tried = r is None or r.status_code != 429 or tried  # a 429 was refused before anything was done
            await asyncio.sleep(_backoff(r))
        self.ledger.gave_up += 1


def _backoff(r: httpx.Response | None) -> float:
    if r is not None and r.status_code == 429:
        try:
            return min(float(r.headers.get("Retry-After", "1")), 5.0)
        except ValueError:
            return 1.0
    return 0.25
