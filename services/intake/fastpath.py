"""The hot path of ``POST /v1/issues`` in plain ASGI.

Reports are nearly all of the intake's traffic, and on the ordinary route most of their CPU went to the
framework (routing, dependency solving, the response machinery), not to needle. This middleware sits
inside the tracing, security-header, body-limit and CORS middleware, so a report it answers still gets
its trace id, metrics, headers and size limit. It answers only the plain case: a JSON body that
validates, a valid bearer token, a grid worker (or admin) reporting into a grid of their scope. Anything
else — bad JSON, a field refused, a token refused, a grid outside the scope — is handed, untouched and
before anything is recorded, to the FastAPI route (``issues_api.report_issue``), which stays the
specification: it checks everything again and words the error. Once the report is being recorded, an
error is answered here, through the same rendering as the app's exception handlers.
"""
from __future__ import annotations

import time
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.auth import Principal, TokenError
from shared.domain.errors import DomainError

from . import problems
from .context import AppContext
from .issues_api import SOURCE, etag, record_report, validate_report
from .schemas import ReportIssueBody
from .security import check_rate, require_area, require_role

PATH = "/v1/issues"
JSON_TYPES = (b"application/json", b"application/json; charset=utf-8", b"application/json;charset=utf-8")


class ReportFastPath:
    def __init__(self, app: ASGIApp, ctx: AppContext, route: BaseRoute) -> None:
        self.app, self.ctx, self.route = app, ctx, route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        authorization = content_type = key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = authorization or value
            elif name == b"content-type":
                content_type = content_type or value
            elif name == b"idempotency-key":
                key = key or value
        body = await _read_body(receive)
        if body is None:  # the client went away
            return
        accepted = self._accept(authorization, content_type, body)
        if accepted is None:  # the route checks it all again and words the error
            await self.app(scope, problems.replay_body(body, receive), send)
            return
        principal, report = accepted
        scope["route"] = self.route  # for the metrics' route label, as the router would set it
        try:
            check_rate(self.ctx, principal, write=True)
            outcome = await record_report(self.ctx, principal, report,
                                          key.decode("latin-1") if key is not None else None, SOURCE)
        except (DomainError, TokenError) as exc:
            await problems.render(exc)(scope, receive, send)
            return
        if outcome.replayed:
            state = outcome.state
            assert state is not None
            payload = {"id": state.id, "status": state.status, "version": state.version}
            version, seq, extra = state.version, state.last_seq, [(b"idempotent-replayed", b"true")]
        else:
            payload = {"id": outcome.issue_id, "status": "reported", "version": 1}
            version, seq, extra = 1, outcome.seq, []
        content = orjson.dumps(payload)
        headers = [(b"content-length", str(len(content)).encode()), (b"content-type", b"application/json"),
                   (b"etag", etag(version).encode()), (b"needle-seq", str(seq).encode()),
                   (b"location", f"{PATH}/{payload['id']}".encode()), *extra]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": content})

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
            validate_report(self.ctx, report)
            require_area(self.ctx.org, principal, report.grid, f"grid {report.grid}")
        except (TokenError, orjson.JSONDecodeError, ValidationError, DomainError):
            return None
        return principal, report


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(chunks)
