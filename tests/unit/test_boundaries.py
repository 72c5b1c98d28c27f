"""Area boundaries: validated on load (shared/config/boundaries.py via parse_org) and the point -> grid
lookup (first covering grid by id, nearest within the tolerance, none farther out)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.config.loader import ConfigError
from shared.config.org import load_org, parse_org


def box(x0: float, y0: float, x1: float, y1: float) -> str:
    return json.dumps({"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]})


def org(g1: str, g2: str, parent: str | None = None, extra: str = "") -> str:
    community = f", boundary: {parent}" if parent else ""
    return f"""{extra}areas:
  - {{id: c, name: C, level: city}}
  - {{id: m, name: M, level: community, parent: c{community}}}
  - {{id: g1, name: G1, level: grid, parent: m, boundary: {g1}}}
  - {{id: g2, name: G2, level: grid, parent: m, boundary: {g2}}}
"""


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_org(text, "deploy/org/x.yaml")
    return info.value


G1, G2 = box(122.100, 30.0, 122.103, 30.004), box(122.103, 30.0, 122.106, 30.004)
PARENT = box(122.100, 30.0, 122.106, 30.004)


def test_siblings_sharing_a_border_load_and_the_border_goes_to_the_first_grid_by_id() -> None:
    tree = parse_org(org(G1, G2, PARENT))
    index = tree.grid_index
    assert tree.warnings == ()
    assert index.locate(30.002, 122.1015) == "g1" and index.locate(30.002, 122.1045) == "g2"
    assert index.covering(30.002, 122.103) == ["g1", "g2"] and index.locate(30.002, 122.103) == "g1"
    assert index.locate(30.002, 122.09985) == "g1"  # ~14 m outside: within the default 30 m
    assert index.locate(30.002, 122.0995) is None  # ~48 m outside
    assert index.distance_m("g2", 30.002, 122.1015) == pytest.approx(144.6, abs=1.0)
    assert index.distance_m("g1", 30.002, 122.1015) == 0.0 and index.distance_m("m", 30.0, 122.1) is None


def test_an_invalid_polygon_is_refused_naming_the_area() -> None:
    bowtie = json.dumps({"type": "Polygon", "coordinates": [[[122.1, 30.0], [122.103, 30.004], [122.103, 30.0],
                                                              [122.1, 30.004], [122.1, 30.0]]]})
    e = error(org(bowtie, G2))
    assert "areas[2].boundary" in str(e) and "not a valid polygon" in str(e)
    assert "Polygon or MultiPolygon" in str(error(org(json.dumps({"type": "Point", "coordinates": [1, 2]}), G2)))
    assert "longitude, latitude" in str(error(org(box(30.0, 122.1, 30.004, 122.103), G2)))


def test_siblings_overlapping_beyond_the_tolerance_are_refused() -> None:
    slight = box(122.1029, 30.0, 122.106, 30.004)  # ~10 m over grid 1: within 30 m
    assert parse_org(org(G1, slight)).grid_index
    wide = box(122.1020, 30.0, 122.106, 30.004)  # ~100 m over
    assert "areas[2].boundary: boundary overlaps its sibling 'g2'" in str(error(org(G1, wide)))
    assert parse_org(org(G1, wide, extra="boundary_tolerance_m: 200\n")).boundary_tolerance_m == 200


def test_a_child_outside_its_parent_is_refused_and_a_gap_is_a_warning() -> None:
    e = error(org(G1, box(122.103, 30.0, 122.110, 30.004), PARENT))
    assert "areas[3].boundary" in str(e) and "outside its parent 'm'" in str(e)
    narrow = box(122.103, 30.0, 122.105, 30.004)  # leaves ~190 m of the community uncovered
    tree = parse_org(org(G1, narrow, PARENT))
    assert len(tree.warnings) == 1 and "area 'm'" in tree.warnings[0]


def test_a_boundary_file_is_read_relative_to_the_org_file(tmp_path: Path) -> None:
    (tmp_path / "grids").mkdir()
    (tmp_path / "grids" / "g2.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": json.loads(G2)}]}))
    (tmp_path / "org.yaml").write_text(org(G1, "grids/g2.geojson"))
    assert load_org(tmp_path / "org.yaml").grid_index.locate(30.002, 122.1045) == "g2"
    (tmp_path / "bad.yaml").write_text(org(G1, "grids/missing.geojson"))
    with pytest.raises(ConfigError, match="cannot read boundary file"):
        load_org(tmp_path / "bad.yaml")
    assert "not loaded from a file" in str(error(org(G1, "grids/g2.geojson")))


def test_an_org_without_boundaries_has_an_empty_index() -> None:
    tree = parse_org("areas:\n  - {id: c, name: C, level: city}\n  - {id: g, name: G, level: grid, parent: c}\n")
    assert not tree.grid_index and tree.grid_index.locate(30.0, 122.0) is None
