"""As root, Postgres runs as an unprivileged user that may not reach the venv (a clone under a
0700 ``mktemp -d``): the binaries are copied to a world-readable cache it can run."""
from __future__ import annotations

import os
import subprocess

import pytest

from services.entrypoints import embedded

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the copy is made only when running as root")


def test_the_copied_install_runs_as_the_postgres_user(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEEDLE_PG_INSTALL_CACHE", str(cache))
    try:
        subprocess.run(["id", embedded.PG_SYSTEM_USER], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin",
                        embedded.PG_SYSTEM_USER], check=True, capture_output=True)
    install = embedded._runnable_pg_install(embedded.PG_SYSTEM_USER)
    assert install.is_relative_to(cache)
    out = subprocess.run([str(install / "bin" / "initdb"), "--version"], capture_output=True, text=True,
                         user=embedded.PG_SYSTEM_USER, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "PostgreSQL" in out.stdout
    # a second start reuses the copy rather than making another
    assert embedded._runnable_pg_install(embedded.PG_SYSTEM_USER) == install
    assert [p.name for p in cache.iterdir()] == [install.parent.parent.name]


def test_a_zombie_postmaster_does_not_count_as_running() -> None:
    """A postgres whose needle up was SIGKILLed ends as a zombie where PID 1 does not reap (a container):
    its postmaster.pid must not block the next start."""
    import os
    import subprocess
    import time
    from pathlib import Path

    from services.entrypoints.embedded import _running

    assert _running(os.getpid())
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 5
        while "Z" not in Path(f"/proc/{child.pid}/status").read_text().split("State:")[1].split()[0]:
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        assert not _running(child.pid)  # exited, not yet reaped: a zombie
    finally:
        child.wait()
    assert not _running(child.pid)  # reaped: gone
