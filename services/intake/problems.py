"""RFC 9457 problem details: every error leaves as application/problem+json naming the field.

The mapping from domain errors to status codes lives here and nowhere else."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.auth import TokenError
from shared.domain.errors import DomainError

PROBLEM = "application/problem+json"

# The OpenAPI description of every error this module sends (RFC 9457 members plus needle's ``field`` and
# ``errors``; extension members such as ``current_version`` are allowed).
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
        "detail": {"type": "string"}, "field": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object", "required": ["field", "detail"],
                                              "properties": {"field": {"type": "string"},
                                                             "detail": {"type": "string"}}}},
    },
}


def problem_response(description: str) -> dict[str, Any]:
    """An OpenAPI response object for ``responses=``: the error leaves as problem+json."""
    return {"description": description, "content": {PROBLEM: {"schema": PROBLEM_SCHEMA}}}


# Routers whose errors go through the handlers below declare them once: every status a route does not
# list (400, 401, 403, 404, 409, 412, 413, 422, 503, ...) is a problem (this also replaces FastAPI's
# default 422 `HTTPValidationError`, which these routes never send).
RESPONSES: dict[int | str, dict[str, Any]] = {"default": problem_response("Error (RFC 9457 problem details)")}


def problem(status: int, title: str, detail: str, *, field: str | None = None, type_: str | None = None,
            headers: dict[str, str] | None = None, **extra: Any) -> Response:
    body: dict[str, Any] = {"type": type_ or f"https://needle.example/problems/{status}", "title": title,
                            "status": status, "detail": detail}
    if field:
        body["field"] = field
        body.setdefault("errors", [{"field": field, "detail": detail}])
    body.update({k: v for k, v in extra.items() if v is not None})
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM, headers=headers)


def _field_of(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _error_of(e: Any) -> dict[str, str]:
    """One validation error as ``{field, detail}``. Malformed JSON names the body: its ``loc`` holds the
    character offset of the fault (``("body", 14)``), which is no field."""
    loc = tuple(e.get("loc", ()))
    if e.get("type") == "json_invalid":
        at = next((p for p in loc if isinstance(p, int)), None)
        where = f" at character {at}" if at is not None else ""
        return {"field": "body", "detail": f"malformed JSON{where}: {e.get('ctx', {}).get('error', e.get('msg'))}"}
    return {"field": _field_of(loc), "detail": e.get("msg", "invalid")}


def render(exc: DomainError | TokenError) -> Response:
    """The problem a domain error or a refused token is answered with (here and by ``fastpath``)."""
    if isinstance(exc, TokenError):
        return problem(401, "Unauthorized", str(exc), headers={"WWW-Authenticate": 'Bearer realm="needle"'})
    headers = {"Retry-After": "1"} if exc.retryable and exc.status >= 500 else None
    if exc.status == 429:
        headers = {"Retry-After": str(exc.extra.get("retry_after", 1))}
    return problem(exc.status, exc.title, exc.detail, field=exc.field, headers=headers, **exc.extra)


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def domain_error(_: Request, exc: DomainError) -> Response:
        return render(exc)

    @app.exception_handler(TokenError)
    async def token_error(_: Request, exc: TokenError) -> Response:
        return render(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        errors = [_error_of(e) for e in exc.errors()]
        first = errors[0] if errors else {"field": "body", "detail": "invalid request"}
        status = 400 if any(e.get("type") == "json_invalid" for e in exc.errors()) else 422
        title = "Malformed JSON" if status == 400 else "Unprocessable input"
        return problem(status, title, f"{first['field']}: {first['detail']}", field=first["field"], errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return problem(exc.status_code, str(exc.detail), str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:  # never a bare 500 page
        import structlog

        structlog.get_logger("needle.http").exception("unhandled error", error=repr(exc))
        return problem(500, "Internal error", "an unexpected error occurred; it has been logged")


class BodyLimit:
    """Refuses bodies larger than ``limit`` bytes with 413 (pure ASGI). A declared Content-Length is
    checked up front; a chunked body is read (up to the limit) before the app sees it. A POST to an
    ``exempt`` path (photo uploads) passes untouched: its route enforces its own limit while streaming."""

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limit = limit
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["path"] in self.exempt and scope.get("method") == "POST"):
            await self.app(scope, receive, send)
            return
        declared = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                declared = True
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = True
                if too_big:
                    await self._refuse(send)
                    return
        if declared or scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)

    async def _refuse(self, send: Send) -> None:
        body = orjson.dumps({"type": "https://needle.example/problems/413", "title": "Payload too large",
                             "status": 413, "detail": f"request body exceeds {self.limit} bytes", "field": "body"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", PROBLEM.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands an app the body already read, then goes on with the client's messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class SecurityHeaders:
    """Security headers on every response (pure ASGI, no overhead): nosniff, no referrer, no framing; a
    ``default-src 'none'`` CSP on what is not HTML and sets none itself (the dashboard page and /docs bring
    their own or need scripts); ``Cache-Control: no-store`` on every answer that sets no caching of its
    own, with or without a bearer token (no shared cache keeps personal data)."""

    HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
               (b"x-frame-options", b"DENY"), (b"cross-origin-opener-policy", b"same-origin"))
    CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
    NO_STORE = (b"cache-control", b"no-store")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @classmethod
    def add(cls, headers: Iterable[tuple[bytes, bytes]], authorized: bool) -> list[tuple[bytes, bytes]]:
        """``headers`` with the security headers added (the fast path's answers get them here too)."""
        out = list(headers)
        names = {name.lower(): value for name, value in out}
        out.extend(cls.HEADERS)
        if b"content-security-policy" not in names and not names.get(b"content-type", b"").startswith(b"text/html"):
            out.append(cls.CSP)
        if b"cache-control" not in names:  # anonymous answers too (Open311 reads): public documents set their own
            out.append(cls.NO_STORE)
        return out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorized = any(name == b"authorization" for name, _ in scope.get("headers", ()))

        async def send_with_headers(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                msg["headers"] = self.add(msg.get("headers", []), authorized)
            await send(msg)

        await self.app(scope, receive, send_with_headers)
