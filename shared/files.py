"""Files at rest: private directories and files created private (docs/SECURITY.md, "Files at rest").

A file that holds a secret or a URL with credentials is created with mode 0600 from its first byte
(``O_CREAT | O_EXCL`` with the mode, then renamed into place), never written 0644 and chmod'ed afterwards:
between the two another local user could open it and keep the descriptor.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

PRIVATE_DIRS = ("logs", "nats", "secrets")  # of a data dir, besides the data dir itself


def private_dir(path: Path) -> Path:
    """``path`` (and missing parents) as a directory only its owner may enter (0700); an existing one is
    tightened to 0700, never widened."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def prepare_data_dir(data_dir: Path) -> Path:
    """The data dir and its ``logs/``, ``nats/`` and ``secrets/``, each 0700."""
    private_dir(data_dir)
    for name in PRIVATE_DIRS:
        private_dir(data_dir / name)
    return data_dir


def write_private(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` atomically; the file is 0600 from its creation."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def create_private_once(path: Path, data: str) -> str:
    """``path``'s content, creating it (0600) with ``data`` if it does not exist yet. Safe when several processes
    start at once (``needle up`` and its children make the data dir's secrets together): the file appears whole
    or not at all (written aside, then hard-linked into place, which fails if another process won), so no reader
    ever sees it empty or half-written; every process ends with the winner's content."""
    if not path.exists():
        private_dir(path.parent)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
            with contextlib.suppress(FileExistsError):  # another process made it first: theirs stands
                os.link(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path.read_text()


def open_private(path: Path) -> int:
    """A new file (it must not exist) opened for writing, 0600 from its creation: a file descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
