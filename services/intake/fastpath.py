"""The hot path of ``POST /v1/issues``, in plain ASGI, ahead of the framework.

Reports are nearly all of the intake's traffic. On the ordinary route most of their CPU went to the
framework: the middleware stack (FastAPI's own error, telemetry and body-limit layers, then ours), the
routing, dependency solving and the response machinery. ``NeedleAPI`` hands ``POST /v1/issues`` to
``ReportFastPath`` before any of that, and the fast path answers only the plain case: a declared body
within NEEDLE_MAX_BODY_BYTES, no ``Origin`` (CORS stays with its middleware), JSON that validates, a valid
bearer token, a grid worker (or admin) reporting into a grid of their scope. Anything else is handed,
untouched and before anything is recorded, to the whole app (``issues_api.report_issue`` behind every
middleware), which stays the specification: it checks everything again and words the error.

An answer from here carries what the middleware would have added, from the same code: the trace id
(``observability.trace_of``, bound for the request's log lines and the events' ``correlationid``), the
security headers (``problems.SecurityHeaders.add``) and the request's metrics (``Metrics.observe``). Once
the report is being recorded, an error is answered here, through the app's own problem rendering.
"""
from __future__ import annotations

import functools
import time
from typing import Any

import orjson
import structlog
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from shared import tracing
from shared.auth import Principal, TokenError
from shared.domain.errors import DomainError

from . import problems
from .context import AppContext
from .issues_api import SOURCE, etag, record_report, validate_report
from .observability import Metrics, log, trace_of
from .schemas import ReportIssueBody
from .security import check_rate, require_area, require_role

PATH = "/v1/issues"
VARY = (b"vary", b"Origin")
# what SecurityHeaders adds to an answer to a bearer token that sets no CSP, no caching and is not HTML: every
# answer from here (JSON or problem+json); computed by the middleware's own code, once
SECURITY = problems.SecurityHeaders.add([], authorized=True)
JSON_TYPES = (b"application/json", b"application/json; charset=utf-8", b"application/json;charset=utf-8")


class NeedleAPI(FastAPI):
    """The FastAPI app, with ``POST /v1/issues`` offered to the fast path first (when one is set)."""

    report_path: ReportFastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.report_path
        if fast is not None and scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST":
            await fast(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    def take_reports_first(self, ctx: AppContext, metrics: Metrics) -> None:
        self.report_path = ReportFastPath(functools.partial(FastAPI.__call__, self), ctx, metrics)


class ReportFastPath:
    """``app`` is the whole application, for everything this path does not answer itself."""

    def __init__(self, app: ASGIApp, ctx: AppContext, metrics: Metrics) -> None:
        self.app, self.ctx, self.metrics = app, ctx, metrics
        self.limit = ctx.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = content_type = key = length = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = authorization or value
            elif name == b"content-type":
                content_type = content_type or value
            elif name == b"idempotency-key":
                key = key or value
            elif name == b"content-length":
                length = value if length is None else b"-"  # two lengths: the app refuses it
            elif name == b"origin":  # a browser: the CORS middleware answers
                length = b"-"
                break
        if length is None or not length.isdigit() or int(length) > self.limit:
            await self.app(scope, receive, send)  # chunked, too big, CORS: the middleware's business
            return
        body = await _read_body(receive)
        if body is None:  # the client went away
            return
        accepted = self._accept(authorization, content_type, body)
        if accepted is None:  # the route checks it all again and words the error
            await self.app(scope, problems.replay_body(body, receive), send)
            return
        principal, report = accepted
        t0 = time.perf_counter()
        trace_id, echo = trace_of(scope["headers"])
        trace_token = tracing.current.set(trace_id)
        log_tokens = structlog.contextvars.bind_contextvars(trace_id=trace_id)
        try:
            status, headers, content = await self._record(principal, report, key)
        except (DomainError, TokenError) as exc:
            status, headers, content = _parts(problems.render(exc))
        except Exception as exc:  # as the app's handler for the unexpected: logged, a problem, never a bare 500
            log.exception("unhandled error", error=repr(exc))
            status, headers, content = _parts(problems.problem(
                500, "Internal error", "an unexpected error occurred; it has been logged"))
        finally:
            structlog.contextvars.reset_contextvars(**log_tokens)
            tracing.current.reset(trace_token)
        headers.append(VARY)  # as the CORS middleware says of an answer to a request without an Origin
        headers.extend(SECURITY)
        headers.extend(echo)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        elapsed = time.perf_counter() - t0
        self.metrics.observe("POST", PATH, status, elapsed)
        log.debug("request", method="POST", route=PATH, status=status, ms=round(elapsed * 1000, 2), trace_id=trace_id)

    async def _record(self, principal: Principal, report: ReportIssueBody, key: bytes | None
                      ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        check_rate(self.ctx, principal, write=True)
        outcome = await record_report(self.ctx, principal, report, key.decode("latin-1") if key is not None else None,
                                      SOURCE)
        if outcome.replayed:
            state = outcome.state
            assert state is not None
            payload = {"id": state.id, "status": state.status, "version": state.version}
            version, seq, extra = state.version, state.last_seq, [(b"idempotent-replayed", b"true")]
        else:
            payload = {"id": outcome.issue_id, "status": "reported", "version": 1}
            version, seq, extra = 1, outcome.seq, []
        content = orjson.dumps(payload)
        return 201, [(b"content-length", str(len(content)).encode()), (b"content-type", b"application/json"),
                     (b"etag", etag(version).encode()), (b"needle-seq", str(seq).encode()),
                     (b"location", f"{PATH}/{payload['id']}".encode()), *extra], content

    def _accept(self, authorization: bytes | None, content_type: bytes | None, body: bytes
                ) -> tuple[Principal, ReportIssueBody] | None:
        """The principal and the report when nothing about them needs an error, else None."""
        if authorization is None or content_type is None or content_type.lower() not in JSON_TYPES:
            return None
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        try:
            principal = self.ctx.verifier.verify(token.strip(), time.time())
            data: Any = orjson.loads(body)
            if not isinstance(data, dict):
                return None
            report = ReportIssueBody.model_validate(data)
            require_role(principal, "grid_worker")
            report = validate_report(self.ctx, report)
            assert report.grid is not None
            require_area(self.ctx.org, principal, report.grid, f"grid {report.grid}")
        except (TokenError, orjson.JSONDecodeError, ValidationError, DomainError):
            return None
        return principal, report


def _parts(response: Response) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return response.status_code, list(response.raw_headers), bytes(response.body)


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(chunks)
