"""Open311 wire formats: JSON and XML bodies, and the spec's error list.

GeoReport v2 answers lists of objects. JSON is the plain list; XML wraps it in a root element whose children
are one element per object (``<services><service>…``, ``<service_requests><request>…``). A field holding a list
becomes a container element with one child per item (``<attributes><attribute>…``, ``<values><value>…``).
Errors are ``[{"code": 404, "description": "…"}]`` or ``<errors><error><code/><description/></error></errors>``.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import orjson
from starlette.responses import Response

Format = Literal["json", "xml"]
FORMATS: tuple[Format, ...] = ("json", "xml")
JSON_TYPE = "application/json; charset=utf-8"
XML_TYPE = "text/xml; charset=utf-8"
XML_DECLARATION = '<?xml version="1.0" encoding="utf-8"?>\n'
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")  # not allowed in XML 1.0

# container element -> element of each item (XML only)
ITEM_TAGS: dict[str, str] = {
    "attributes": "attribute", "values": "value", "endpoints": "endpoint", "formats": "format",
}


class Open311Error(Exception):
    """An error answered in the spec's form with ``status`` (400, 403, 404, ...)."""

    def __init__(self, status: int, description: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.headers = dict(headers or {})


def split_format(name: str) -> tuple[str, Format]:
    """``"sea_safety.json"`` -> ``("sea_safety", "json")``; 404 when the suffix is not .json or .xml."""
    stem, dot, suffix = name.rpartition(".")
    fmt = suffix.lower()
    if not dot or not stem or fmt not in FORMATS:
        raise Open311Error(404, f"{name!r} is not a resource: add the format suffix .json or .xml")
    return stem, fmt


def check_format(suffix: str) -> Format:
    fmt = suffix.lower()
    if fmt not in FORMATS:
        raise Open311Error(404, f"unknown format {suffix!r}: use .json or .xml")
    return fmt


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return _NOT_XML.sub("\ufffd", str(value))


def _fill(elem: ET.Element, value: Any) -> None:
    if isinstance(value, Mapping):
        for key, inner in value.items():
            _fill(ET.SubElement(elem, str(key)), inner)
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        tag = ITEM_TAGS.get(elem.tag, "item")
        for inner in value:
            _fill(ET.SubElement(elem, tag), inner)
    else:
        elem.text = _text(value)


def to_xml(root_tag: str, item_tag: str | None, body: Any) -> bytes:
    """``body`` is a list of objects (each becomes an ``item_tag`` element) or, with ``item_tag`` None,
    one object whose fields become the root's children."""
    root = ET.Element(root_tag)
    if item_tag is None:
        _fill(root, body)
    else:
        for item in body:
            _fill(ET.SubElement(root, item_tag), item)
    return (XML_DECLARATION + ET.tostring(root, encoding="unicode")).encode()


def render(fmt: Format, body: Any, *, root: str, item: str | None, status: int = 200,
           headers: Mapping[str, str] | None = None) -> Response:
    if fmt == "xml":
        return Response(to_xml(root, item, body), status_code=status, media_type=XML_TYPE, headers=headers)
    return Response(orjson.dumps(body), status_code=status, media_type=JSON_TYPE, headers=headers)


def error_response(fmt: Format, status: int, description: str,
                   headers: Mapping[str, str] | None = None) -> Response:
    return render(fmt, [{"code": status, "description": description}], root="errors", item="error",
                  status=status, headers=headers)
