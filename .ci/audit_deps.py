#!/usr/bin/env python3
"""Dependency audit for CI: run pip-audit over the project's environment and judge its report.

* known vulnerabilities in an audited dependency: fail (exit 1), listing them;
* the vulnerability service answered for some dependencies only: pass, saying how many could not be audited;
* it answered for none (unreachable, or every per-version lookup refused, as behind a registry mirror that
  serves only the simple index): pass with a loud WARNING, never a silent "no known vulnerabilities".

Usage: .ci/audit_deps.py [PIP_AUDIT]   (default: .venv/bin/pip-audit)
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TIMEOUT_S = 300


def verdict(report: dict[str, Any] | None, stderr: str, rc: int) -> tuple[int, str]:
    """(exit code, message) for one pip-audit run: its JSON report (None if it wrote none), stderr, exit."""
    if report is None:
        if rc == 0:
            return 0, "WARNING: pip-audit wrote no report; dependencies NOT audited"
        tail = stderr.strip().splitlines()[-1:] or ["(no output)"]
        return 0, f"WARNING: pip-audit could not run (exit {rc}: {tail[0][:300]}); dependencies NOT audited"
    deps = report.get("dependencies", [])
    audited = [d for d in deps if "skip_reason" not in d]
    skipped = [d for d in deps if "skip_reason" in d]
    vulnerable = [d for d in audited if d.get("vulns")]
    if vulnerable:
        def fixes(v: dict[str, Any]) -> str:
            return ", ".join(v.get("fix_versions") or ["?"])

        lines = [f"  {d['name']} {d['version']}: " + ", ".join(f"{v['id']} (fixed in {fixes(v)})" for v in d["vulns"])
                 for d in vulnerable]
        return 1, "pip-audit: known vulnerabilities in dependencies:\n" + "\n".join(lines)
    if not audited:
        reason = skipped[0]["skip_reason"] if skipped else "no dependencies listed"
        return 0, (f"WARNING: the vulnerability service answered for none of {len(skipped)} dependencies "
                   f"(e.g. {reason!r}); dependencies NOT audited")
    note = f"; {len(skipped)} could not be audited" if skipped else ""
    return 0, f"pip-audit: no known vulnerabilities in {len(audited)} audited dependencies{note}"


def main(argv: list[str]) -> int:
    tool = argv[1] if len(argv) > 1 else ".venv/bin/pip-audit"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        try:
            run = subprocess.run([tool, "--progress-spinner", "off", "--skip-editable", "--format", "json",
                                  "--output", str(out)], capture_output=True, text=True, timeout=TIMEOUT_S)
            rc, stderr = run.returncode, run.stderr
        except (OSError, subprocess.TimeoutExpired) as exc:
            rc, stderr = 127, repr(exc)
        try:
            report = json.loads(out.read_text())
        except (OSError, ValueError):
            report = None
    code, message = verdict(report, stderr, rc)
    print(message, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
