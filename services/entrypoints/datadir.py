"""One needle per data dir.

The process that serves a data dir (``needle up``, or ``needle run`` on embedded servers) holds an exclusive
``flock`` on ``DIR/needle.lock`` for as long as it lives; the kernel releases it when that process dies, however
it dies, so a SIGKILLed needle never blocks the next start. ``DIR/runtime.json`` says where the holder's servers
are. Every other command either attaches to the holder (through runtime.json, only while the lock is held) or,
when nobody holds it, takes the lock itself before it starts servers of its own on the store."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.files import prepare_data_dir, write_private

LOCK_FILE = "needle.lock"
RUNTIME_FILE = "runtime.json"


class DataDirBusy(RuntimeError):
    """Another process serves the data dir. Retrying helps only once that process has stopped."""

    def __init__(self, data_dir: Path, holder: dict[str, Any]) -> None:
        self.data_dir, self.holder = data_dir, holder
        where = ", ".join(f"{k} {holder[k]}" for k in ("pid", "http") if holder.get(k)) or "its pid unknown"
        super().__init__(f"needle is already running on {data_dir} ({where}); stop it first, or use another "
                         "--data-dir")


def read_runtime(data_dir: Path) -> dict[str, Any]:
    """What the holder wrote of itself (empty when it wrote nothing, yet or any more)."""
    try:
        info = json.loads((data_dir / RUNTIME_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def write_runtime(data_dir: Path, info: dict[str, Any]) -> None:
    """0600 from its creation (it names the servers, and the database URL carries a password), replaced
    atomically."""
    write_private(data_dir / RUNTIME_FILE, json.dumps(info, indent=2))


def _open_lock(data_dir: Path) -> int:
    return os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def is_held(data_dir: Path) -> bool:
    """Whether a live process holds the data dir (probed with a shared lock, released at once)."""
    if not (data_dir / LOCK_FILE).exists():
        return False
    fd = _open_lock(data_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the probe's lock
    return False


@contextlib.contextmanager
def hold(data_dir: Path, *, attempts: int = 5) -> Iterator[None]:
    """Hold the data dir exclusively, or raise :class:`DataDirBusy` naming its holder. A few quick attempts
    ride out another command's momentary probe (``is_held``)."""
    prepare_data_dir(data_dir)  # 0700, with logs/, nats/, secrets/
    fd = _open_lock(data_dir)
    try:
        for attempt in range(attempts):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == attempts - 1:
                    raise DataDirBusy(data_dir, read_runtime(data_dir)) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
