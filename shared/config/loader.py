"""YAML reading with line numbers, and the small validation toolkit the org and rulebook loaders share.

Every problem in a configuration file becomes one :class:`ConfigError` that names the file, the line,
the path inside the document (``departments[3].kind``, ``categories.sea_safety.sla.resolve``) and what is
wrong, so that ``needle up`` can print one line a person can act on::

    deploy/org/x.yaml:42: areas[3].level: unknown area level 'town' (known: grid, community, street, district, city)

The YAML is composed into nodes with a :class:`yaml.SafeLoader` subclass and converted by hand, which keeps
a side table ``path -> line`` (1-based, the line where the entry starts). Mapping keys are taken verbatim
as strings, so the YAML 1.1 quirk that reads ``on:`` as ``True`` does not bite ``escalate.on``.
"""
from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import yaml

from shared.domain.levels import LEVEL_ORDER, Level

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
"""Ids of areas, departments, categories and risk flags: letters, digits, '_' and '-' (no dots or spaces)."""


class ConfigError(Exception):
    """A configuration file cannot be used as it is.

    ``file`` is the file name (or the ``source`` given to a ``parse_*`` function), ``line`` the 1-based line
    (None when unknown), ``path`` the location inside the document ("" for the whole file) and ``problem``
    the human-readable reason.
    """

    def __init__(self, problem: str, *, file: str, line: int | None = None, path: str = "") -> None:
        self.problem = problem
        self.file = file
        self.line = line
        self.path = path
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.problem}" if self.path else f"{where}: {self.problem}"


class LineLoader(yaml.SafeLoader):
    """A safe loader whose nodes are converted by :func:`parse_yaml`, recording each entry's line."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_yaml(text: str, source: str) -> tuple[Any, Document]:
    """Parse one YAML document into plain dicts/lists/scalars plus the :class:`Document` that knows its lines."""
    doc = Document(source)
    loader = LineLoader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else doc._convert(loader, node, "")
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = " ".join(p for p in (e.context, e.problem) if p) or "malformed document"
        raise ConfigError(f"invalid YAML: {problem}", file=source, line=mark.line + 1 if mark else None) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", file=source) from e
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError("the file is empty; expected a mapping", file=source, line=1)
    return data, doc


def read_source(path: str | Path) -> tuple[str, str, str]:
    """Read a configuration file: ``(text, file name for messages, sha256 hex of its bytes)``."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the file: {e.strerror or e}", file=name) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=name) from e
    return text, name, hashlib.sha256(raw).hexdigest()


def text_digest(text: str) -> str:
    """The sha256 hex of ``text`` as UTF-8 bytes (what :func:`read_source` computes for a file)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def suggest(word: str, known: Iterable[str]) -> str:
    """'; did you mean ...?' for a close match among ``known``, else ''."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.75)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing"}.get(
        type(value), f"{type(value).__name__} {value!r}"
    )


class Document:
    """The lines of one parsed document and the checks that raise :class:`ConfigError` pointing into it."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[str, int] = {}

    # -- conversion -------------------------------------------------------------------------------------------
    def _convert(self, loader: LineLoader, node: yaml.Node, path: str) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # honour '<<' merge keys
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode):
                    self.fail(path, "mapping keys must be plain strings", line=knode.start_mark.line + 1)
                key = str(knode.value)
                sub = _join(path, key)
                if key in out:
                    self.fail(sub, f"duplicate key '{key}'", line=knode.start_mark.line + 1)
                self.lines[sub] = knode.start_mark.line + 1
                out[key] = self._convert(loader, vnode, sub)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(loader, item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        return loader.construct_object(node, deep=True)

    # -- errors -----------------------------------------------------------------------------------------------
    def line(self, path: str) -> int | None:
        """The line of ``path``, or of its nearest enclosing entry that has one."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""

    def error(self, path: str, problem: str, *, line: int | None = None) -> ConfigError:
        return ConfigError(problem, file=self.file, line=line if line is not None else self.line(path), path=path)

    def fail(self, path: str, problem: str, *, line: int | None = None) -> NoReturn:
        raise self.error(path, problem, line=line)

    # -- typed reads ------------------------------------------------------------------------------------------
    def mapping(
        self, value: Any, path: str, *, required: Iterable[str] = (), optional: Iterable[str] = ()
    ) -> dict[str, Any]:
        """``value`` as a mapping with only the allowed keys and every required one (unless both are empty)."""
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {_type_name(value)}")
        req, opt = tuple(required), tuple(optional)
        if req or opt:
            allowed = (*req, *opt)
            for key in value:
                if key not in allowed:
                    hint = f"(allowed: {', '.join(allowed)}){suggest(key, allowed)}"
                    self.fail(_join(path, key), f"unknown key '{key}' {hint}")
            for key in req:
                if key not in value:
                    self.fail(_join(path, key), f"missing required field '{key}'", line=self.line(path))
        return value

    def sequence(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_type_name(value)}")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            hint = " (quote it)" if isinstance(value, int | float | bool) else ""
            self.fail(path, f"expected a non-empty string, got {_type_name(value)}{hint}")
        return value

    def ident(self, value: Any, path: str, what: str = "id") -> str:
        text = value if isinstance(value, str) else self.string(value, path)
        if not ID_PATTERN.match(text):
            self.fail(path, f"invalid {what} {text!r}: use letters, digits, '_' and '-' only")
        return text

    def number(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"expected a number, got {_type_name(value)}")
        return float(value)

    def choice(self, value: Any, path: str, known: Iterable[str], what: str) -> str:
        options = tuple(known)
        if value is None or isinstance(value, dict | list):
            self.fail(path, f"expected one of {', '.join(options)}, got {_type_name(value)}")
        text = value if isinstance(value, str) else str(value)
        if text not in options:
            self.fail(path, f"unknown {what} {text!r} (known: {', '.join(options)}){suggest(text, options)}")
        return text

    def level(self, value: Any, path: str, what: str = "level") -> Level:
        return Level(self.choice(value, path, (lv.value for lv in LEVEL_ORDER), what))

    def duration(self, value: Any, path: str) -> timedelta:
        if not isinstance(value, str):
            self.fail(path, f"expected an ISO 8601 duration such as PT4H or P2D, got {_type_name(value)}")
        try:
            return parse_duration(value)
        except ValueError as e:
            self.fail(path, str(e))


_DURATION = re.compile(
    r"^P(?!$)(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?=\d)(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+(?:[.,]\d+)?)S)?)?$"
)


def parse_duration(text: str) -> timedelta:
    """Parse an ISO 8601 duration of weeks, days, hours, minutes and seconds (``PT15M``, ``P2D``, ``P1DT12H``,
    ``P2W``) into a timedelta. Months and years are refused: they have no fixed length.

    >>> parse_duration("P1DT2H30M")
    datetime.timedelta(days=1, seconds=9000)
    """
    s = text.strip()
    date_part = s.split("T", 1)[0]
    if s.startswith("P") and ("Y" in date_part or "M" in date_part):
        raise ValueError(
            f"bad duration {text!r}: months and years have no fixed length; write days or weeks (e.g. P30D)"
        )
    m = _DURATION.match(s)
    if m is None:
        raise ValueError(f"bad ISO 8601 duration {text!r} (expected PnW or PnDTnHnMnS, e.g. PT15M, P2D, P1DT12H)")
    parts = {k: float(v.replace(",", ".")) for k, v in m.groupdict().items() if v is not None}
    return timedelta(**parts)


def format_duration(delta: timedelta) -> str:
    """The inverse of :func:`parse_duration` for whole seconds (``timedelta(hours=1)`` -> ``PT1H``)."""
    total = int(delta.total_seconds())
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    time = "".join(f"{n}{u}" for n, u in ((hours, "H"), (minutes, "M"), (seconds, "S")) if n)
    out = "P" + (f"{days}D" if days else "") + (f"T{time}" if time else "")
    return out if out != "P" else "PT0S"

