"""The CI dependency audit's judgement (.ci/audit_deps.py) of pip-audit reports."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def gate() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / ".ci" / "audit_deps.py"
    spec = importlib.util.spec_from_file_location("audit_deps", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_known_vulnerability_fails_naming_package_id_and_fix(gate: ModuleType) -> None:
    report = {"dependencies": [
        {"name": "pyjwt", "version": "2.3.0", "vulns": [{"id": "PYSEC-2022-202", "fix_versions": ["2.4.0"]}]},
        {"name": "orjson", "version": "3.10.0", "vulns": []},
        {"name": "odd", "version": "1", "skip_reason": "Dependency not found on PyPI"}]}
    code, message = gate.verdict(report, "", 1)
    assert code == 1 and "pyjwt 2.3.0" in message and "PYSEC-2022-202" in message and "2.4.0" in message


def test_a_clean_audit_passes_and_counts_what_was_skipped(gate: ModuleType) -> None:
    report = {"dependencies": [{"name": "orjson", "version": "3.10.0", "vulns": []},
                               {"name": "odd", "version": "1", "skip_reason": "not on PyPI"}]}
    assert gate.verdict(report, "", 0) == (
        0, "pip-audit: no known vulnerabilities in 1 audited dependencies; 1 could not be audited")


def test_nothing_audited_or_no_service_passes_with_a_warning(gate: ModuleType) -> None:
    none_audited = {"dependencies": [{"name": "a", "version": "1", "skip_reason": "Dependency not found on PyPI"}]}
    for report, stderr, rc in [(none_audited, "", 0), (None, "ConnectionError: Failed to resolve 'api.osv.dev'", 1),
                               (None, "", 0)]:
        code, message = gate.verdict(report, stderr, rc)
        assert code == 0 and message.startswith("WARNING") and "NOT audited" in message
