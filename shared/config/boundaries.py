"""Area boundaries and the point -> grid lookup.

An area of the org may carry a ``boundary``: a GeoJSON Polygon or MultiPolygon (longitude, latitude, as
GeoJSON orders them), inline or as a file reference relative to the org file (a geometry, a Feature or a
FeatureCollection of one feature). On load:

* every boundary is a valid polygon (closed rings, no self-intersection);
* siblings (areas with the same parent) do not overlap by more than the org's tolerance
  (``boundary_tolerance_m``, default 30 m): an overlap that holds a disc of that radius is an error;
* a child lies inside its parent's boundary (when both have one), up to the tolerance;
* gaps (a parent's boundary not covered by its children's, beyond the tolerance) are warnings only.

Distances are metres on a local equirectangular projection around the boundaries' mean latitude: good to
well under 1 % across a city, which is what a tolerance of a few tens of metres needs.

The lookup (:class:`GridIndex`) keeps the grids' boundaries in shapely's STRtree. A point covered by several
grids (exactly on a shared border) belongs to the first of them by id, so the answer never depends on
load order. A point outside every grid but within the tolerance of one belongs to the nearest (GPS jitter
along a coast or a road that is the border); farther out it belongs to none.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Point, Polygon, shape
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity

METRES_PER_DEGREE = 6371008.8 * math.pi / 180  # mean Earth radius
DEFAULT_TOLERANCE_M = 30.0


class BoundaryError(ValueError):
    """A boundary that cannot be used; the org loader names the area and the field."""


def geometry_of(value: Any) -> BaseGeometry:
    """A shapely (Multi)Polygon from a GeoJSON geometry, Feature or one-feature FeatureCollection."""
    if not isinstance(value, dict):
        raise BoundaryError("a boundary is a GeoJSON object (type Polygon or MultiPolygon) or a file name")
    kind = value.get("type")
    if kind == "FeatureCollection":
        features = value.get("features") or []
        if len(features) != 1:
            raise BoundaryError(f"a FeatureCollection boundary holds exactly one feature, not {len(features)}")
        return geometry_of(features[0])
    if kind == "Feature":
        return geometry_of(value.get("geometry"))
    if kind not in ("Polygon", "MultiPolygon"):
        raise BoundaryError(f"a boundary is a Polygon or MultiPolygon, not {kind!r}")
    try:
        geom = shape(value)
    except (ValueError, TypeError, IndexError, AttributeError, KeyError) as e:
        raise BoundaryError(f"not a valid GeoJSON {kind}: {e}") from None
    if geom.is_empty:
        raise BoundaryError("the boundary is empty")
    for x, y in _coords(geom):
        if not (-180.0 <= x <= 180.0 and -90.0 <= y <= 90.0):
            raise BoundaryError(f"coordinate [{x:g}, {y:g}] is not [longitude, latitude]")
    if not geom.is_valid:
        raise BoundaryError(f"not a valid polygon: {explain_validity(geom)}")
    return geom


def _coords(geom: BaseGeometry) -> list[tuple[float, float]]:
    polys = geom.geoms if isinstance(geom, MultiPolygon) else [geom]
    out: list[tuple[float, float]] = []
    for p in polys:
        assert isinstance(p, Polygon)
        out.extend((float(x), float(y)) for x, y, *_ in p.exterior.coords)
    return out


@dataclass(frozen=True)
class Projection:
    """Degrees -> metres around ``lat0`` (equirectangular)."""

    lat0: float

    def metres(self, geom: BaseGeometry) -> BaseGeometry:
        k, c = METRES_PER_DEGREE, math.cos(math.radians(self.lat0))

        def fn(xy: np.ndarray) -> np.ndarray:
            return np.column_stack((xy[:, 0] * k * c, xy[:, 1] * k))

        return shapely.transform(geom, fn)

    def point(self, lat: float, lon: float) -> Point:
        k = METRES_PER_DEGREE
        return Point(lon * k * math.cos(math.radians(self.lat0)), lat * k)


def projection_for(geoms: list[BaseGeometry]) -> Projection:
    if not geoms:
        return Projection(0.0)
    return Projection(sum(g.centroid.y for g in geoms) / len(geoms))


Fail = Callable[[str, str], None]


def check_boundaries(boundaries: dict[str, BaseGeometry], parents: dict[str, str | None], tolerance_m: float,
                     fail: Fail) -> list[str]:
    """The load-time rules (module docstring). ``fail(area_id, message)`` raises; returns the warnings."""
    proj = projection_for(list(boundaries.values()))
    metric = {aid: proj.metres(g) for aid, g in boundaries.items()}
    by_parent: dict[str | None, list[str]] = {}
    for aid in metric:
        by_parent.setdefault(parents.get(aid), []).append(aid)
    for siblings in by_parent.values():
        tree = shapely.STRtree([metric[a] for a in siblings])
        for i, aid in enumerate(siblings):
            for j in tree.query(metric[aid]):
                other = siblings[int(j)]
                if int(j) <= i:
                    continue
                overlap = metric[aid].intersection(metric[other])
                if not overlap.is_empty and not overlap.buffer(-tolerance_m).is_empty:
                    fail(aid, f"boundary overlaps its sibling '{other}' by more than {tolerance_m:g} m "
                              f"(about {overlap.area:.0f} m²)")
    warnings: list[str] = []
    for parent, children in by_parent.items():
        if parent is None or parent not in metric:
            continue
        outer = metric[parent].buffer(tolerance_m)
        for child in children:
            outside = metric[child].difference(outer)
            if not outside.is_empty and outside.area > 1.0:
                fail(child, f"boundary reaches outside its parent '{parent}' by more than {tolerance_m:g} m "
                            f"(about {outside.area:.0f} m²)")
        covered = shapely.union_all([metric[c] for c in children]).buffer(tolerance_m)
        gap = metric[parent].difference(covered)
        if not gap.is_empty and gap.area > 1.0:
            warnings.append(f"area '{parent}': about {gap.area:.0f} m² of its boundary is in none of its "
                            f"children's ({', '.join(sorted(children))})")
    return warnings


class GridIndex:
    """Point -> grid over the grids that have a boundary (STRtree, metres)."""

    def __init__(self, grids: dict[str, BaseGeometry], tolerance_m: float = DEFAULT_TOLERANCE_M,
                 projection: Projection | None = None) -> None:
        self.ids = sorted(grids)
        self.projection = projection or projection_for([grids[g] for g in self.ids])
        self.shapes = [self.projection.metres(grids[g]) for g in self.ids]
        self.tolerance_m = tolerance_m
        self.tree = shapely.STRtree(self.shapes)
        self._index = {g: i for i, g in enumerate(self.ids)}

    def __bool__(self) -> bool:
        return bool(self.ids)

    def __contains__(self, grid: str) -> bool:
        return grid in self._index

    def covering(self, lat: float, lon: float) -> list[str]:
        """Every grid whose boundary covers the point (its border included), by id."""
        pt = self.projection.point(lat, lon)
        hits = self.tree.query(pt, predicate="intersects")
        return sorted(self.ids[int(i)] for i in hits)

    def locate(self, lat: float, lon: float) -> str | None:
        """The grid of the point: the first covering grid by id, else the nearest within the tolerance."""
        inside = self.covering(lat, lon)
        if inside:
            return inside[0]
        pt = self.projection.point(lat, lon)
        near = self.tree.query(pt, predicate="dwithin", distance=self.tolerance_m)
        if len(near) == 0:
            return None
        return min((self.shapes[int(i)].distance(pt), self.ids[int(i)]) for i in near)[1]

    def distance_m(self, grid: str, lat: float, lon: float) -> float | None:
        """Metres from the point to the grid's boundary (0 inside); None when the grid has no boundary."""
        i = self._index.get(grid)
        if i is None:
            return None
        return float(self.shapes[i].distance(self.projection.point(lat, lon)))
