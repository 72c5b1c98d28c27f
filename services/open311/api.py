"""Open311 GeoReport v2 under ``/open311/v2/`` (docs/OPEN311.md): services from the rulebook, requests through
the same report path as ``POST /v1/issues``, and reads from the event store and the read models.

Every answer under ``/open311`` — errors included — is in the spec's JSON or XML form (the path's suffix picks
it): the routes take the raw Request and parse their inputs here, so FastAPI's validation never answers.
"""
from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime

import asyncpg
import nats.errors
import structlog
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from services.intake.context import AppContext
from services.intake.issues_api import record_report, validate_report
from services.intake.schemas import ReportIssueBody
from services.intake.security import FILERS, can_read, check_rate, ctx_of, in_area, require_filing
from shared.auth import Principal, TokenError
from shared.commanding import load_existing_state, utcnow
from shared.domain import ids
from shared.domain.errors import Conflict, DomainError, Invalid, RateLimited
from shared.ratelimit import Rate, RateLimiter, retry_after

from . import catalog, search, view
from .formats import FORMATS, Format, Open311Error, check_format, error_response, render, split_format
from .inputs import (
    Params,
    attributes,
    description_public_of,
    first,
    place,
    read_params,
    resident_of,
    risk_of,
    urgency_of,
)

router = APIRouter(tags=["open311"])
log = structlog.get_logger("needle.open311")
BASE = "/open311/v2"
SOURCE = "needle/open311"
MAX_WAIT_S = 5.0
STARTED = datetime.now(UTC)
_KNOWN_PATH = re.compile(r"^v2/(discovery|services|requests|tokens)(\.[^/]*|/[^/]+)$")
_LOAD_CONCURRENCY = 16

# What the routes answer, for the OpenAPI document: JSON or XML (the path's suffix picks it), and errors as the
# spec's list ``[{code, description}]`` (or its XML form) with any status, never problem+json.
_XML = {"text/xml": {"schema": {"type": "string"}}}
_ERRORS = {"type": "array", "items": {"type": "object", "required": ["code", "description"],
                                      "properties": {"code": {"type": "integer"}, "description": {"type": "string"}}}}


def _responses(status: int = 200) -> dict[int | str, dict[str, object]]:
    return {status: {"content": _XML},
            "default": {"description": "GeoReport v2 error list", "content": {"application/json": {"schema": _ERRORS},
                                                                             **_XML}}}


def _guess(source: str) -> Format:
    suffix = source.rpartition(".")[2].lower()
    return suffix if suffix in FORMATS else "json"


async def _answer(source: str, work: Callable[[Format], Awaitable[Response]]) -> Response:
    """Run ``work`` and turn every failure into the spec's error list, in the requested format."""
    fmt = _guess(source)
    try:
        return await work(fmt)
    except Open311Error as e:
        return error_response(fmt, e.status, e.description, e.headers)
    except TokenError as e:
        return error_response(fmt, 403, f"api_key: {e}")
    except DomainError as e:
        status = {422: 400, 412: 400}.get(e.status, e.status)
        headers = {"Retry-After": "1"} if e.retryable else None
        return error_response(fmt, status, e.detail, headers)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, nats.errors.Error, OSError, TimeoutError) as e:
        log.warning("open311 backend unavailable", error=repr(e))
        return error_response(fmt, 503, "temporarily unavailable; retry shortly", {"Retry-After": "1"})
    except Exception as e:  # never a bare 500 page, never problem+json
        log.exception("open311 unhandled error", error=repr(e))
        return error_response(fmt, 500, "an unexpected error occurred; it has been logged")


def _jurisdiction(ctx: AppContext, params: Params) -> None:
    wanted = first(params, "jurisdiction_id")
    if wanted is not None and wanted != ctx.org.root.id:
        raise Open311Error(404, f"jurisdiction_id {wanted!r} not found (this endpoint serves {ctx.org.root.id!r})")


def _query(request: Request) -> Params:
    out: Params = {}
    for key, value in request.query_params.multi_items():
        out.setdefault(key, []).append(value)
    return out


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _no_key_in_query(request: Request) -> None:
    """A key in the query string ends up in proxies' and servers' access logs and in browser history."""
    if "api_key" in request.query_params:
        raise Open311Error(400, "api_key must not be sent in the query string: send it as a form field of the "
                                "POST body or as Authorization: Bearer")


def _verify(ctx: AppContext, key: str) -> Principal:
    try:
        return ctx.verifier.verify(key)
    except TokenError as e:
        raise Open311Error(403, f"api_key is not valid ({e})") from None


def _reader(ctx: AppContext, request: Request) -> Principal | None:
    """Who reads: the key's principal (its own rate bucket), or None for an anonymous reader, rate-limited per
    client address (NEEDLE_OPEN311_ANONYMOUS_PER_S / _BURST). A key that is sent must be valid (403)."""
    _no_key_in_query(request)
    key = _bearer(request)
    if key is not None:
        p = _verify(ctx, key)
        try:
            check_rate(ctx, p, write=False)
        except RateLimited as e:
            raise Open311Error(429, e.detail, {"Retry-After": str(e.extra["retry_after"])}) from None
        return p
    limiter: RateLimiter | None = getattr(request.app.state, "open311_anonymous", None)
    if limiter is None:
        rate = Rate(ctx.settings.open311_anonymous_per_s, ctx.settings.open311_anonymous_burst)
        limiter = request.app.state.open311_anonymous = RateLimiter(reads=rate, writes=rate)
    client = request.client.host if request.client is not None else "unknown"
    wait = limiter.check(f"addr:{client}", write=False, now=time.monotonic())
    if wait > 0:
        raise Open311Error(429, f"too many requests without an api_key from this address (limit "
                                f"{limiter.reads.per_s:g}/s, burst {limiter.reads.burst:g}); retry in {wait:.1f} s",
                           {"Retry-After": str(retry_after(wait))})
    return None


def _covers(ctx: AppContext, p: Principal | None, grid: str, departments: Iterable[str | None] = ()) -> bool:
    """True when the reader's key covers an issue of ``grid`` (a handler: one of ``departments``)."""
    if p is None:
        return False
    if p.role == "handler":
        return p.scope_id in set(departments)
    return p.role == "integrator" or in_area(ctx.org, p, grid)


def _principal(ctx: AppContext, request: Request, params: Params) -> Principal:
    _no_key_in_query(request)
    key = first(params, "api_key") or _bearer(request)
    if key is None:
        raise Open311Error(403, "api_key was not provided")
    p = _verify(ctx, key)
    if p.role not in FILERS:  # integrators read (DESIGN.md); a public app files with a reporter key
        raise Open311Error(403, f"api_key of role {p.role} may not submit requests (needs {', '.join(FILERS)})")
    try:
        check_rate(ctx, p, write=True)
    except RateLimited as e:
        raise Open311Error(429, e.detail, {"Retry-After": str(e.extra["retry_after"])}) from None
    return p


def _title(description: str | None, fallback: str) -> str:
    line = next((" ".join(x.split()) for x in (description or "").splitlines() if x.strip()), "")
    if not line:
        return fallback
    return line if len(line) <= 80 else line[:79] + "…"


async def _append(ctx: AppContext, p: Principal, body: ReportIssueBody, key: str | None) -> tuple[str, bool, int]:
    """The report path of ``POST /v1/issues``: (issue id, replayed?, stream seq)."""
    try:
        out = await record_report(ctx, p, body, key, SOURCE)
    except Conflict as exc:
        raise Conflict("Idempotency-Key was already used with a different request") from exc
    return out.issue_id, out.replayed, out.seq


async def _create(request: Request, fmt: Format) -> Response:
    ctx = ctx_of(request)
    params = await read_params(request)
    _jurisdiction(ctx, params)
    p = _principal(ctx, request, params)
    code = first(params, "service_code")
    if code is None:
        raise Open311Error(400, "service_code was not provided")
    category = ctx.rulebook.categories.get(code)
    if category is None:
        raise Open311Error(400, f"service_code {code!r} not found (see services.{fmt})")
    attrs = attributes(params)
    urgency, risk = urgency_of(attrs), risk_of(ctx.rulebook, attrs)
    where = place(ctx.org, params, attrs)
    require_filing(ctx.org, ctx.rulebook, p, where.grid, urgency, risk)
    description = first(params, "description")
    public = description_public_of(params)
    title = _title(description, category.name)
    if where.address is not None:  # an address without a point: keep it where the handler will read it (never
        # published: the anonymous view leaves it out, view.public_description)
        description = f"{description}\n\n{view.ADDRESS_LABEL}{where.address}" if description else \
            f"{view.ADDRESS_LABEL}{where.address}"
    # first_name, last_name and phone become the sealed resident; media_url is kept as an external link (never
    # fetched); email, device_id and account_id are accepted and not stored
    try:
        body = ReportIssueBody(grid=where.grid, category=code, title=title, description=description,
                               urgency=urgency, risk=list(risk), location=where.location,  # type: ignore[arg-type]
                               resident=resident_of(params),  # type: ignore[arg-type]
                               media_url=first(params, "media_url") or None, description_public=public)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err.get("loc", ())) or "request"
        field = {"resident.phone": "phone", "resident.name": "first_name"}.get(field, field)
        raise Open311Error(400, f"{field}: {err.get('msg', 'invalid')}") from None
    body = validate_report(ctx, body)  # a point outside every grid, or outside attribute[grid]: 400
    issue_id, replayed, seq = await _append(ctx, p, body, request.headers.get("idempotency-key"))
    item = {"service_request_id": issue_id, "token": issue_id,
            "service_notice": catalog.service_notice(ctx.rulebook, code, urgency), "account_id": None}
    headers = {"Location": f"{BASE}/requests/{issue_id}.{fmt}", "Needle-Seq": str(seq)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return render(fmt, [item], root="service_requests", item="request", status=201, headers=headers)


async def _by_ids(ctx: AppContext, wanted: tuple[str, ...], p: Principal | None) -> list[dict[str, object]]:
    sem = asyncio.Semaphore(_LOAD_CONCURRENCY)

    async def one(issue_id: str) -> dict[str, object] | None:
        try:
            ids.check_issue_id(issue_id)
        except Invalid:
            return None
        async with sem:
            state, envs = await load_existing_state(ctx.store, issue_id)
        if not state.exists:
            return None
        return view.from_state(ctx.org, ctx.rulebook, state, envs, full=p is not None and can_read(ctx.org, p, state))

    found = await asyncio.gather(*(one(i) for i in wanted))
    return [r for r in found if r is not None]


async def _list(request: Request, fmt: Format) -> Response:
    ctx = ctx_of(request)
    params = _query(request)
    _jurisdiction(ctx, params)
    p = _reader(ctx, request)
    wanted = search.comma_list(first(params, "service_request_id"))
    if wanted:
        if len(wanted) > search.MAX_IDS:
            raise Open311Error(400, f"at most {search.MAX_IDS} service_request_id values at once")
        return render(fmt, await _by_ids(ctx, wanted, p), root="service_requests", item="request")
    f = search.filters(start=first(params, "start_date"), end=first(params, "end_date"),
                       service_code=first(params, "service_code"), status=first(params, "status"),
                       tz=ctx.rulebook.tz, now=utcnow())
    if ctx.read_models is None:
        raise Open311Error(503, "request search needs the read models, which do not run in this process; "
                                "ask by service_request_id", {"Retry-After": "5"})
    min_seq = request.headers.get("needle-min-seq", "")
    pool, worker = ctx.read_models.pool, ctx.read_models.progress
    if min_seq.isdigit():
        await worker.wait_for(int(min_seq), MAX_WAIT_S)  # answer anyway: Needle-Seq tells what it reflects
    rows = await search.list_requests(pool, f)
    headers = {"Needle-Seq": str(worker.seq)} if worker is not None else None
    body = [view.from_row(ctx.org, ctx.rulebook, r, full=_covers(ctx, p, r["grid"], (r["lead_department"],)))
            for r in rows]
    return render(fmt, body, root="service_requests", item="request", headers=headers)


async def _one(request: Request, name: str, tokens: bool) -> Response:
    ctx = ctx_of(request)
    _jurisdiction(ctx, _query(request))
    p = _reader(ctx, request)
    stem, fmt = split_format(name)
    what = "token" if tokens else "service_request_id"
    try:
        issue_id = ids.check_issue_id(stem)
    except Invalid:
        raise Open311Error(404, f"{what} {stem} not found") from None
    state, envs = await load_existing_state(ctx.store, issue_id)
    if not state.exists:
        raise Open311Error(404, f"{what} {stem} not found")
    if tokens:  # the token is the request id: it is known as soon as the POST answers
        body = [{"service_request_id": issue_id, "token": issue_id}]
    else:
        full = p is not None and can_read(ctx.org, p, state)
        body = [view.from_state(ctx.org, ctx.rulebook, state, envs, full=full)]
    return render(fmt, body, root="service_requests", item="request")


# -- routes ---------------------------------------------------------------------------------------------------
@router.get(BASE + "/discovery.{fmt}", summary="Open311 endpoint discovery", responses=_responses())
async def discovery(request: Request, fmt: str) -> Response:
    async def work(_: Format) -> Response:
        f = check_format(fmt)
        url = str(request.base_url).rstrip("/") + BASE + "/"
        changeset = view.ts(STARTED, ctx_of(request).rulebook.tz)
        body = {"changeset": changeset, "contact": "the operator of this needle",
                "key_service": "api_key: a needle bearer token (needle token issue --role reporter)",
                "endpoints": [{"specification": "http://wiki.open311.org/GeoReport_v2", "url": url,
                               "changeset": changeset, "type": "production",
                               "formats": ["application/json", "text/xml"]}]}
        return render(f, body, root="discovery", item=None)

    return await _answer(fmt, work)


@router.get(BASE + "/services.{fmt}", summary="Service list: one service per rulebook category", responses=_responses())
async def service_list(request: Request, fmt: str) -> Response:
    async def work(_: Format) -> Response:
        f = check_format(fmt)
        ctx = ctx_of(request)
        _jurisdiction(ctx, _query(request))
        return render(f, catalog.service_list(ctx.rulebook), root="services", item="service")

    return await _answer(fmt, work)


@router.get(BASE + "/services/{name}", summary="Service definition (name is <service_code>.json|.xml)",
            responses=_responses())
async def service_definition(request: Request, name: str) -> Response:
    async def work(_: Format) -> Response:
        code, f = split_format(name)
        ctx = ctx_of(request)
        _jurisdiction(ctx, _query(request))
        try:
            body = catalog.definition(ctx.rulebook, code)
        except KeyError:
            raise Open311Error(404, f"service_code {code!r} not found") from None
        return render(f, body, root="service_definition", item=None)

    return await _answer(name, work)


@router.get(BASE + "/requests.{fmt}", summary="Search service requests (public, non-personal fields)",
            responses=_responses())
async def get_requests(request: Request, fmt: str) -> Response:
    return await _answer(fmt, lambda _: _list(request, check_format(fmt)))


@router.post(BASE + "/requests.{fmt}", status_code=201, summary="Submit a service request (api_key)",
             responses=_responses(201))
async def post_request(request: Request, fmt: str) -> Response:
    return await _answer(fmt, lambda _: _create(request, check_format(fmt)))


@router.get(BASE + "/requests/{name}", summary="One service request (name is <id>.json|.xml)", responses=_responses())
async def get_request(request: Request, name: str) -> Response:
    return await _answer(name, lambda _: _one(request, name, tokens=False))


@router.get(BASE + "/tokens/{name}", summary="The service_request_id of a token (name is <token>.json|.xml)",
            responses=_responses())
async def get_token(request: Request, name: str) -> Response:
    return await _answer(name, lambda _: _one(request, name, tokens=True))


@router.api_route("/open311", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                  include_in_schema=False)
@router.api_route("/open311/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                  include_in_schema=False)
async def fallback(request: Request, rest: str = "") -> Response:
    """Anything else under /open311: 404 (or 405 on a known resource), in the spec's error form."""
    fmt = _guess(rest)
    if _KNOWN_PATH.match(rest):
        allow = "GET, POST" if re.match(r"^v2/requests\.", rest) else "GET"
        return error_response(fmt, 405, f"method {request.method} not allowed here", {"Allow": allow})
    return error_response(fmt, 404, f"no Open311 resource at {request.url.path}; see {BASE}/services.json")
