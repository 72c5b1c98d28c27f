"""Reading a GeoReport v2 POST: form-encoded (the spec), multipart or JSON, into the report path's inputs.

Parameters become ``{name: [values]}`` (query string first, then the body). Attributes follow the spec:
``attribute[urgency]=urgent``, ``attribute[risk][]=violence&attribute[risk][]=mass_casualty``; a JSON body may
also send ``"attribute": {"urgency": "urgent", "risk": ["violence"]}``.

Location, first that is given: ``attribute[grid]`` (a grid id), ``lat`` + ``long`` (the grid whose boundary
holds the point, as ``POST /v1/issues`` finds it; in an org whose grids have no boundaries, the nearest grid
with a location, at most MAX_GRID_KM away), ``address_string`` (the org's area names it contains or is part of).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request

from shared.config import OrgTree
from shared.config.org import Area
from shared.config.rulebook import URGENCIES, Rulebook
from shared.domain.levels import Level
from shared.events.models import Location

from .catalog import ATTRIBUTE_CODES
from .formats import Open311Error

Params = dict[str, list[str]]
MAX_GRID_KM = 20.0  # a point farther than this from every grid is outside the jurisdiction
_ATTRIBUTE = re.compile(r"^attribute\[([^\[\]]+)\](\[\])?$")


def _add(params: Params, key: str, value: str) -> None:
    params.setdefault(key, []).append(value)


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise Open311Error(400, f"parameter {key!r} must be a string or a number")


def _from_json(raw: bytes) -> Params:
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise Open311Error(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Open311Error(400, "a JSON body must be an object of parameters")
    params: Params = {}
    for key, value in data.items():
        if value is None:
            continue
        if key == "attribute" and isinstance(value, dict):
            for code, v in value.items():
                if isinstance(v, list):
                    for item in v:
                        _add(params, f"attribute[{code}][]", _scalar(f"attribute[{code}]", item))
                elif v is not None:
                    _add(params, f"attribute[{code}]", _scalar(f"attribute[{code}]", v))
        elif isinstance(value, list):
            for item in value:
                _add(params, key, _scalar(key, item))
        else:
            _add(params, key, _scalar(key, value))
    return params


def _from_multipart(content_type: str, raw: bytes) -> Params:
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    if not message.is_multipart():
        raise Open311Error(400, "malformed multipart/form-data body")
    params: Params = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or part.get_filename():  # files (media) are not stored
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            _add(params, name, payload.decode(part.get_content_charset() or "utf-8", errors="replace"))
    return params


async def read_params(request: Request) -> Params:
    params: Params = {}
    for key, value in request.query_params.multi_items():
        _add(params, key, value)
    raw = await request.body()
    ctype = request.headers.get("content-type", "").lower()
    if "json" in ctype:
        body = _from_json(raw)
    elif ctype.startswith("multipart/form-data"):
        body = _from_multipart(request.headers["content-type"], raw)
    elif not ctype or ctype.startswith(("application/x-www-form-urlencoded", "text/plain")):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Open311Error(400, "the form body is not UTF-8") from None
        body = {}
        for key, value in parse_qsl(text, keep_blank_values=True):
            _add(body, key, value)
    else:
        raise Open311Error(400, f"unsupported content type {ctype!r}: send application/x-www-form-urlencoded "
                                "(the spec), multipart/form-data or application/json")
    for key, values in body.items():
        params.setdefault(key, []).extend(values)
    return params


def first(params: Params, name: str) -> str | None:
    """The first non-blank value of ``name``, stripped; None when absent."""
    for value in params.get(name, ()):
        if value.strip():
            return value.strip()
    return None


def attributes(params: Params) -> dict[str, list[str]]:
    """``attribute[code]`` / ``attribute[code][]`` -> {code: [values]}; 400 on an unknown code."""
    out: dict[str, list[str]] = {}
    for key, values in params.items():
        if not key.startswith("attribute"):
            continue
        m = _ATTRIBUTE.match(key)
        if m is None:
            raise Open311Error(400, f"malformed attribute parameter {key!r}: use attribute[code] or attribute[code][]")
        code = m.group(1)
        if code not in ATTRIBUTE_CODES:
            raise Open311Error(400, f"unknown attribute {code!r} (known: {', '.join(sorted(ATTRIBUTE_CODES))})")
        out.setdefault(code, []).extend(v.strip() for v in values if v.strip())
    return out


def urgency_of(attrs: dict[str, list[str]]) -> str:
    values = attrs.get("urgency", [])
    if len(values) > 1:
        raise Open311Error(400, "attribute urgency takes one value")
    value = values[0] if values else "normal"
    if value not in URGENCIES:
        raise Open311Error(400, f"attribute urgency must be one of {', '.join(URGENCIES)}, not {value!r}")
    return value


def risk_of(rulebook: Rulebook, attrs: dict[str, list[str]]) -> tuple[str, ...]:
    flags = [f for v in attrs.get("risk", []) for f in v.split(",") if f.strip()]
    for flag in flags:
        if flag.strip() not in rulebook.risk:
            raise Open311Error(400, f"attribute risk: unknown value {flag.strip()!r} "
                                    f"(known: {', '.join(sorted(rulebook.risk))})")
    return tuple(dict.fromkeys(f.strip() for f in flags))


def _coordinate(params: Params, name: str, bound: float) -> float:
    raw = first(params, name)
    try:
        value = float(raw) if raw is not None else math.nan
    except ValueError:
        raise Open311Error(400, f"{name} must be a decimal number, not {raw!r}") from None
    if not math.isfinite(value) or not -bound <= value <= bound:
        raise Open311Error(400, f"{name} must be a number in [-{bound:g}, {bound:g}], not {raw!r}")
    return value


def _km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


def grid_by_address(org: OrgTree, address: str) -> Area:
    """The one grid the address names: areas whose name the address contains (or that contain the whole
    address) are matched; the grids under the deepest matched area, most matches first, must be one."""
    matched = {a.id for a in org.areas.values() if a.name in address or (len(address) >= 2 and address in a.name)}
    if not matched:
        raise Open311Error(400, f"address_string {address!r} names no area of this jurisdiction; "
                                "send lat/long or attribute[grid]")
    best: list[Area] = []
    best_key: tuple[int, int] | None = None
    for grid in (a for a in org.areas.values() if a.level == Level.grid):
        hits = [a for a in org.ancestors(grid.id) if a.id in matched]
        if not hits:
            continue
        key = (-min(a.level.rank for a in hits), len(hits))
        if best_key is None or key > best_key:
            best, best_key = [grid], key
        elif key == best_key:
            best.append(grid)
    if len(best) != 1:
        names = "、".join(g.name for g in best[:5]) + ("…" if len(best) > 5 else "")
        raise Open311Error(400, f"address_string {address!r} is ambiguous ({len(best)} grids: {names}); "
                                "send lat/long or attribute[grid]")
    return best[0]


@dataclass(frozen=True, slots=True)
class Place:
    grid: str
    location: Location | None  # the reported point (with the address when given)
    address: str | None  # an address without a point (kept in the description)


def place(org: OrgTree, params: Params, attrs: dict[str, list[str]]) -> Place:
    address = first(params, "address_string")
    if address is not None and len(address) > 500:
        raise Open311Error(400, "address_string is longer than 500 characters")
    has_point = first(params, "lat") is not None or first(params, "long") is not None
    location: Location | None = None
    if has_point:
        lat, lon = _coordinate(params, "lat", 90.0), _coordinate(params, "long", 180.0)
        location = Location(lat=lat, lon=lon, address=address)
    grids = attrs.get("grid", [])
    if len(grids) > 1:
        raise Open311Error(400, "attribute grid takes one value")
    if grids:
        area = org.areas.get(grids[0])
        if area is None or area.level != Level.grid:
            raise Open311Error(400, f"attribute grid: {grids[0]!r} is not a grid of this jurisdiction")
        return Place(area.id, location, None if location else address)
    if location is not None and org.grid_index:
        grid = org.grid_index.locate(location.lat, location.lon)
        if grid is None:
            raise Open311Error(400, f"lat/long {location.lat:g},{location.lon:g} is outside every grid of this "
                                    "jurisdiction")
        return Place(grid, location, None)
    if location is not None:
        nearest = org.nearest_grid(location.lat, location.lon)
        if nearest is None or nearest.location is None:
            raise Open311Error(400, "this jurisdiction has no grid with a location: send attribute[grid]")
        if _km(location.lat, location.lon, nearest.location.lat, nearest.location.lon) > MAX_GRID_KM:
            raise Open311Error(400, f"lat/long {location.lat:g},{location.lon:g} is outside the jurisdiction "
                                    f"(more than {MAX_GRID_KM:g} km from every grid)")
        return Place(nearest.id, location, None)
    if address is not None:
        return Place(grid_by_address(org, address).id, None, address)
    hint = " (address_id is not supported here)" if first(params, "address_id") else ""
    raise Open311Error(400, f"a location is required: lat and long, address_string or attribute[grid]{hint}")


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def description_public_of(params: Params) -> bool:
    """needle's extension ``description_public``: the reporter agrees that the description be published in
    anonymous reads. ``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``); absent: false."""
    raw = first(params, "description_public")
    if raw is None or raw.lower() in _FALSE:
        return False
    if raw.lower() in _TRUE:
        return True
    raise Open311Error(400, f"description_public must be true or false, not {raw[:40]!r}")


def _cjk(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def resident_of(params: Params) -> dict[str, str] | None:
    """GeoReport's requester fields as needle's ``resident``: the name from ``first_name``/``last_name``
    (Chinese names family name first: 张 + 三 = 张三), and ``phone``. ``email``, ``device_id`` and
    ``account_id`` are not kept."""
    given, family = first(params, "first_name"), first(params, "last_name")
    phone = first(params, "phone")
    parts = [x.strip() for x in (given, family) if x and x.strip()]
    if parts and _cjk("".join(parts)):
        name = "".join(x.strip() for x in (family, given) if x and x.strip())
    else:
        name = " ".join(parts)
    out = {k: v for k, v in (("name", name), ("phone", (phone or "").strip())) if v}
    return out or None
