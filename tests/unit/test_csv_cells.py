"""CSV exports neutralise cells a spreadsheet would run as formulas (services/projections/api.py)."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.projections.api import csv_cell


@pytest.mark.parametrize("text", ["=1+1", "+1", "-2", "@SUM(A1)", "\tx", "\rx", '=HYPERLINK("http://x","y")'])
def test_a_cell_that_starts_a_formula_becomes_text(text: str) -> None:
    assert csv_cell(text) == "'" + text


@pytest.mark.parametrize("value", ["pothole", "", "a=b", " =x", 3, -3, 1.5, None, True])
def test_other_cells_are_kept(value: object) -> None:
    assert csv_cell(value) == value


def test_dates_are_written_as_in_json() -> None:
    assert csv_cell(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)).startswith("2026-01-02T03:04:05")
