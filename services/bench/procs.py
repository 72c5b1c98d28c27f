"""Child processes of a benchmark: each in its own session (process group), output into a log
file, stopped with SIGTERM to the whole group (SIGKILL if it lingers)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from services.entrypoints.processes import free_port

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
CONTRACT_ORG = FIXTURES / "contract_org.yaml"
CONTRACT_RULES = FIXTURES / "contract_rules.yaml"
GRID, CATEGORY, SCOPE = "wuxing-g1", "road_damage", "area:wuxing-g1"

__all__ = ["CONTRACT_ORG", "CONTRACT_RULES", "Child", "free_port", "issue_token", "needle_argv"]


def needle_argv(*args: str) -> list[str]:
    """The needle CLI of this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "services.entrypoints.cli", *args]


# the load generators drive one token far past any per-token limit: the limiter still runs (its cost is in the
# figures) but never refuses (docs/SECURITY.md)
UNLIMITED = {"NEEDLE_RATE_LIMIT_PER_S": "1e9", "NEEDLE_RATE_LIMIT_BURST": "1000000000",
             "NEEDLE_RATE_LIMIT_READ_PER_S": "1e9", "NEEDLE_RATE_LIMIT_READ_BURST": "1000000000"}


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    log: Path
    name: str

    @classmethod
    def start(cls, name: str, argv: list[str], log: Path, env: Mapping[str, str] | None = None) -> Child:
        log.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, **UNLIMITED, **(env or {})}
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=full_env, cwd=REPO)
        return cls(proc=proc, log=log, name=name)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_line(self, marker: str, timeout: float) -> str:
        """Block until a line containing ``marker`` appears in the log; returns that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                for line in self.log.read_text(errors="replace").splitlines():
                    if marker in line:
                        return line
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not print {marker!r} within {timeout:.0f} s:\n{self.tail()}")

    def wait_http(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status < 500:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout:.0f} s:\n{self.tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


@contextlib.contextmanager
def running(child: Child) -> Iterator[Child]:
    try:
        yield child
    finally:
        child.stop()


def issue_token(data_dir: Path, role: str = "grid_worker", scope: str = SCOPE) -> str:
    """``needle token issue`` for the server using ``data_dir`` (the bench's services run on the contract org)."""
    out = subprocess.run(needle_argv("token", "issue", "--data-dir", str(data_dir), "--role", role, "--scope", scope,
                                     "--org", str(CONTRACT_ORG)), check=True, capture_output=True, text=True, cwd=REPO)
    return out.stdout.strip().splitlines()[-1]
