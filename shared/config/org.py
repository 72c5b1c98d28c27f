"""The org tree (deploy/org/*.yaml): the territory from city down to grids, and the units attached to it.

Contract format (DESIGN.md, "Contract: org tree and rulebook")::

    areas:
      - {id: zhoushan, name: 舟山市, level: city}
      - {id: putuo, name: 普陀区, level: district, parent: zhoushan, location: {lat: 29.95, lon: 122.30}}
      - {id: zhanmao-g33, name: 第33网格, level: grid, parent: putuo, households: 128}
    departments:          # a unit of some kind, serving an area and everything under it
      - {id: putuo-ocean, name: 普陀区海洋与渔业局, kind: ocean_fisheries, area: putuo,
         contact: "+8613800000001"}   # optional: the duty contact notified of dispatches (config, not events)
    kinds:                # optional: display names of the kinds (the API and the dashboard show them)
      ocean_fisheries: 海洋与渔业

Kinds are open: a kind is any identifier ``[a-z][a-z0-9_]*`` a department declares; needle keeps no list of
them (a city's vocabulary never lives in code). What a rulebook names is checked against the org by
:mod:`shared.config.crosscheck`, not against a list.

Rules checked on load: ids are unique across areas *and* departments; every parent exists; the tree has no
cycle and exactly one root; a child's level is strictly below its parent's (levels may be skipped: a small
island township may hold grids directly); every department's kind is a well-formed identifier and its area
exists; ``kinds`` names only well-formed kinds with non-empty names; an optional ``location`` has a latitude in
[-90, 90] and a longitude in [-180, 180]; an optional ``households`` (the grid's household count, the
denominator of its 入户率) is a whole number >= 0, on a grid only.

Boundaries (optional, shared/config/boundaries.py): any area may carry ``boundary:``, a GeoJSON Polygon or
MultiPolygon inline or a file name relative to the org file; ``boundary_tolerance_m:`` (top level, default 30)
is the tolerance of their checks and of the point -> grid lookup. Gaps between children are ``warnings``.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config.boundaries import DEFAULT_TOLERANCE_M, BoundaryError, GridIndex, check_boundaries, geometry_of
from shared.config.loader import Document, parse_yaml, read_source, suggest, text_digest
from shared.domain.levels import Level

KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
"""A department kind: lower-case letters, digits and '_', starting with a letter (``sanitation``, ``fire_rescue``)."""


def check_kind(doc: Document, value: Any, path: str) -> str:
    """``value`` as a well-formed department kind, else a ConfigError at ``path``."""
    text = doc.string(value, path)
    if not KIND_PATTERN.match(text):
        doc.fail(path, f"invalid department kind {text!r}: use lower-case letters, digits and '_', "
                 "starting with a letter (e.g. sanitation, water_conservancy)")
    return text
log = logging.getLogger("needle.org")


@dataclass(frozen=True, slots=True)
class Location:
    lat: float
    lon: float


@dataclass(frozen=True, slots=True)
class Area:
    id: str
    name: str
    level: Level
    parent: str | None = None
    location: Location | None = None
    households: int | None = None  # a grid's household count (its 入户率 denominator), when declared


@dataclass(frozen=True, slots=True)
class Department:
    """A unit of some kind, serving ``area`` and everything under it."""

    id: str
    name: str
    kind: str
    area: str
    contact: str | None = field(default=None, compare=False)
    """The duty contact (值班) the notifier sends dispatches, warnings and breaches to (a phone, an address the
    gateway understands); never written to the event stream."""


@dataclass(frozen=True)
class OrgTree:
    """A validated territory tree. Build it with :func:`load_org` / :func:`parse_org`; the constructor trusts
    its input (areas listed parents first is not required)."""

    areas: dict[str, Area]
    departments: dict[str, Department]
    version: str = ""
    kind_names: dict[str, str] = field(default_factory=dict)
    """Display names of kinds (the org's optional ``kinds:`` map); :meth:`kind_name` falls back to the kind."""
    boundaries: dict[str, Any] = field(default_factory=dict)  # area id -> shapely (Multi)Polygon, degrees
    boundary_tolerance_m: float = DEFAULT_TOLERANCE_M
    warnings: tuple[str, ...] = ()  # what loaded but looks wrong (gaps between boundaries)
    _children: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    _by_area: dict[str, tuple[Department, ...]] = field(init=False, repr=False, compare=False)
    _root: str = field(init=False, repr=False, compare=False)
    _lineage: dict[str, frozenset[str]] = field(init=False, repr=False, compare=False)  # is_under's memo
    _serving: dict[tuple[str, str], Department | None] = field(init=False, repr=False, compare=False)  # serving's
    _grids: GridIndex = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        children: dict[str, list[str]] = {aid: [] for aid in self.areas}
        roots = []
        for area in self.areas.values():
            if area.parent is None:
                roots.append(area.id)
            else:
                children.setdefault(area.parent, []).append(area.id)
        by_area: dict[str, list[Department]] = {}
        for dept in self.departments.values():
            by_area.setdefault(dept.area, []).append(dept)
        object.__setattr__(self, "_children", {k: tuple(v) for k, v in children.items()})
        object.__setattr__(self, "_by_area", {k: tuple(v) for k, v in by_area.items()})
        object.__setattr__(self, "_root", roots[0] if roots else "")
        object.__setattr__(self, "_lineage", {})
        object.__setattr__(self, "_serving", {})
        grids = {a: g for a, g in self.boundaries.items() if a in self.areas and self.areas[a].level == Level.grid}
        object.__setattr__(self, "_grids", GridIndex(grids, self.boundary_tolerance_m))

    # -- areas ------------------------------------------------------------------------------------------------
    @property
    def root(self) -> Area:
        """The one area without a parent (usually the city)."""
        return self.areas[self._root]

    def area(self, area_id: str) -> Area:
        """The area with this id; KeyError if there is none."""
        try:
            return self.areas[area_id]
        except KeyError:
            raise KeyError(f"unknown area {area_id!r}") from None

    def children(self, area_id: str) -> list[Area]:
        self.area(area_id)
        return [self.areas[c] for c in self._children.get(area_id, ())]

    def ancestors(self, area_id: str) -> list[Area]:
        """The area itself first, then its parent, ... up to the root."""
        out = [self.area(area_id)]
        while out[-1].parent is not None:
            out.append(self.areas[out[-1].parent])
        return out

    def ancestor_at(self, area_id: str, level: Level) -> Area | None:
        """The ancestor (or the area itself) at exactly ``level``; None when the branch skips that level."""
        return next((a for a in self.ancestors(area_id) if a.level == level), None)

    def owner_at(self, area_id: str, level: Level) -> Area:
        """The nearest ancestor (inclusive) at ``level`` or, when the branch has no area at that level, at the
        next level up that it has; the root when ``level`` is above the whole branch."""
        chain = self.ancestors(area_id)
        return next((a for a in chain if a.level.rank >= level.rank), chain[-1])

    def is_under(self, area_id: str, ancestor_id: str) -> bool:
        """True when ``ancestor_id`` is ``area_id`` or one of its ancestors; False for unknown ids."""
        lineage = self._lineage.get(area_id)  # every report asks it: the area's chain is walked once
        if lineage is None:
            if area_id not in self.areas:
                return False
            lineage = self._lineage[area_id] = frozenset(a.id for a in self.ancestors(area_id))
        return ancestor_id in lineage

    def subtree(self, area_id: str) -> list[Area]:
        """The area and everything under it, parents before children, in file order."""
        out: list[Area] = []
        stack = [area_id]
        self.area(area_id)
        while stack:
            current = stack.pop()
            out.append(self.areas[current])
            stack.extend(reversed(self._children.get(current, ())))
        return out

    def grids_under(self, area_id: str) -> list[Area]:
        """Every grid in the subtree of ``area_id`` (the area itself if it is a grid)."""
        return [a for a in self.subtree(area_id) if a.level == Level.grid]

    def nearest_grid(self, lat: float, lon: float) -> Area | None:
        """The grid whose ``location`` is closest to (lat, lon) on the sphere; None if no grid has one."""
        best: tuple[float, Area] | None = None
        for area in self.areas.values():
            if area.level != Level.grid or area.location is None:
                continue
            d = _haversine_km(lat, lon, area.location.lat, area.location.lon)
            if best is None or d < best[0]:
                best = (d, area)
        return best[1] if best else None

    @property
    def grid_index(self) -> GridIndex:
        """The grids that have a boundary, for point -> grid (empty, and falsy, when none has one)."""
        return self._grids

    # -- departments ------------------------------------------------------------------------------------------
    def department(self, department_id: str) -> Department:
        try:
            return self.departments[department_id]
        except KeyError:
            raise KeyError(f"unknown department {department_id!r}") from None

    def departments_of(self, area_id: str) -> list[Department]:
        """The departments attached exactly to ``area_id``, in file order."""
        self.area(area_id)
        return list(self._by_area.get(area_id, ()))

    @property
    def kinds(self) -> frozenset[str]:
        """Every kind some department of this org declares."""
        return frozenset(d.kind for d in self.departments.values())

    def kind_name(self, kind: str) -> str:
        """The kind's display name from the org's ``kinds:`` map, else the kind itself."""
        return self.kind_names.get(kind, kind)

    def department_of_kind(self, area_id: str, kind: str) -> Department | None:
        """The (first) department of ``kind`` attached exactly to ``area_id``."""
        return next((d for d in self.departments_of(area_id) if d.kind == kind), None)

    def serving(self, area_id: str, kind: str) -> Department | None:
        """The nearest department of ``kind`` attached to ``area_id`` or one of its ancestors (the one that
        serves it: a department serves its area and everything under it); None when there is none."""
        key = (area_id, kind)
        if key in self._serving:  # routing asks it for every kind of every report: each pair is walked once
            return self._serving[key]
        found = None
        for area in self.ancestors(area_id):
            found = self.department_of_kind(area.id, kind)
            if found is not None:
                break
        self._serving[key] = found
        return found


def _haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


# -- loading --------------------------------------------------------------------------------------------------
def load_org(path: str | Path) -> OrgTree:
    """Load and validate an org file; raises :class:`shared.config.loader.ConfigError`."""
    text, name, digest = read_source(path)
    tree = parse_org(text, name, digest=digest, base=Path(path).parent)
    for warning in tree.warnings:  # loads, but looks wrong (gaps between boundaries)
        log.warning("%s: %s", name, warning)
    return tree


def parse_org(text: str, source: str = "<org>", *, digest: str | None = None, base: Path | None = None) -> OrgTree:
    """Parse and validate org YAML ``text``; ``source`` names it in error messages. ``version`` is the
    document's ``version:`` or the first 12 hex digits of the sha256 of the text. Boundary files are read
    relative to ``base`` (the org file's directory)."""
    data, doc = parse_yaml(text, source)
    top = doc.mapping(data, "", required=("areas",), optional=("departments", "kinds", "version",
                                                               "boundary_tolerance_m"))
    version = str(top["version"]) if top.get("version") is not None else (digest or text_digest(text))[:12]
    first_at: dict[str, str] = {}  # id -> path of its definition (areas and departments share one namespace)

    def claim(value: Any, path: str, what: str) -> str:
        ident = doc.ident(value, path, what)
        if ident in first_at:
            first = first_at[ident]
            doc.fail(path, f"duplicate id '{ident}' (already used at {first}, line {doc.line(first)})")
        first_at[ident] = path
        return ident

    areas: dict[str, Area] = {}
    paths: dict[str, str] = {}
    boundaries: dict[str, Any] = {}
    raw_areas = doc.sequence(top["areas"], "areas")
    if not raw_areas:
        doc.fail("areas", "at least one area is required")
    for i, raw in enumerate(raw_areas):
        p = f"areas[{i}]"
        m = doc.mapping(raw, p, required=("id", "name", "level"), optional=("parent", "location", "households",
                                                                         "boundary"))
        aid = claim(m["id"], f"{p}.id", "area id")
        parent = None if m.get("parent") is None else doc.ident(m["parent"], f"{p}.parent", "parent id")
        location = _location(doc, m["location"], f"{p}.location") if m.get("location") is not None else None
        level = doc.level(m["level"], f"{p}.level", "area level")
        households = _households(doc, m["households"], f"{p}.households", level) \
            if m.get("households") is not None else None
        areas[aid] = Area(aid, doc.string(m["name"], f"{p}.name"), level, parent, location, households)
        paths[aid] = p
        if m.get("boundary") is not None:
            boundaries[aid] = _boundary(doc, m["boundary"], f"{p}.boundary", base)
    _check_tree(doc, areas, paths)
    tolerance = DEFAULT_TOLERANCE_M
    if top.get("boundary_tolerance_m") is not None:
        tolerance = doc.number(top["boundary_tolerance_m"], "boundary_tolerance_m")
        if not 0.0 <= tolerance <= 10_000.0:
            doc.fail("boundary_tolerance_m", f"must be between 0 and 10000 metres, got {tolerance:g}")

    def fail(aid: str, message: str) -> None:
        doc.fail(f"{paths[aid]}.boundary", message)

    warnings = check_boundaries(boundaries, {a: areas[a].parent for a in boundaries}, tolerance, fail)

    departments: dict[str, Department] = {}
    for i, raw in enumerate(doc.sequence(top.get("departments") or [], "departments")):
        p = f"departments[{i}]"
        m = doc.mapping(raw, p, required=("id", "name", "kind", "area"), optional=("contact",))
        did = claim(m["id"], f"{p}.id", "department id")
        name = doc.string(m["name"], f"{p}.name")
        kind = check_kind(doc, m["kind"], f"{p}.kind")
        area = doc.ident(m["area"], f"{p}.area", "area id")
        if area not in areas:
            doc.fail(f"{p}.area", f"unknown area '{area}'" + suggest(area, areas))
        contact = doc.string(m["contact"], f"{p}.contact") if m.get("contact") is not None else None
        departments[did] = Department(did, name, kind, area, contact)
    kind_names: dict[str, str] = {}
    for kind, label in doc.mapping(top.get("kinds") or {}, "kinds").items():
        check_kind(doc, kind, f"kinds.{kind}")
        kind_names[kind] = doc.string(label, f"kinds.{kind}")
    return OrgTree(areas=areas, departments=departments, version=version, kind_names=kind_names,
                   boundaries=boundaries, boundary_tolerance_m=tolerance, warnings=tuple(warnings))


def _boundary(doc: Document, value: Any, path: str, base: Path | None) -> Any:
    """An inline GeoJSON geometry, or a file name relative to the org file's directory."""
    if isinstance(value, str):
        if base is None:
            doc.fail(path, f"boundary file {value!r} cannot be read: this org was not loaded from a file")
        file = base / value
        try:
            value = json.loads(file.read_text("utf-8"))
        except OSError as e:
            doc.fail(path, f"cannot read boundary file {str(file)!r}: {e.strerror or e}")
        except ValueError as e:
            doc.fail(path, f"boundary file {str(file)!r} is not JSON: {e}")
    try:
        return geometry_of(value)
    except BoundaryError as e:
        doc.fail(path, str(e))


def _location(doc: Document, value: Any, path: str) -> Location:
    m = doc.mapping(value, path, required=("lat", "lon"))
    lat, lon = doc.number(m["lat"], f"{path}.lat"), doc.number(m["lon"], f"{path}.lon")
    if not -90.0 <= lat <= 90.0:
        doc.fail(f"{path}.lat", f"latitude {lat} is outside [-90, 90]")
    if not -180.0 <= lon <= 180.0:
        doc.fail(f"{path}.lon", f"longitude {lon} is outside [-180, 180]")
    return Location(lat, lon)


def _households(doc: Document, value: Any, path: str, level: Level) -> int:
    if level != Level.grid:
        doc.fail(path, f"only a grid declares households (this area is a {level})")
    n = doc.number(value, path)
    if n != int(n) or n < 0:
        doc.fail(path, f"households is a whole number >= 0, got {value!r}")
    return int(n)


def _check_tree(doc: Document, areas: dict[str, Area], paths: dict[str, str]) -> None:
    """Parents exist, no cycle, strictly decreasing levels, exactly one root."""
    for aid, area in areas.items():
        if area.parent is not None and area.parent not in areas:
            doc.fail(f"{paths[aid]}.parent", f"unknown parent area '{area.parent}'" + suggest(area.parent, areas))
    for aid in areas:
        chain = [aid]
        current = areas[aid].parent
        while current is not None:
            if current in chain:
                loop = " -> ".join([*chain[chain.index(current):], current])
                doc.fail(f"{paths[aid]}.parent", f"cycle in the area tree: {loop}")
            chain.append(current)
            current = areas[current].parent
    for aid, area in areas.items():
        if area.parent is None:
            continue
        parent = areas[area.parent]
        if area.level.rank >= parent.level.rank:
            doc.fail(f"{paths[aid]}.level", f"a {area.level} cannot be under the {parent.level} '{parent.id}' "
                     "(a child's level must be strictly below its parent's)")
    roots = [aid for aid, area in areas.items() if area.parent is None]
    if len(roots) > 1:
        doc.fail(f"{paths[roots[1]]}", f"second root area '{roots[1]}': only one area may have no parent "
                 f"(the root is '{roots[0]}'); add a parent")
