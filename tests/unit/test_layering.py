"""The layers: ``shared/`` (what every service shares: domain core, events, event store, config, auth) imports
nothing from ``services/``; the process wiring lives above the services in ``services/entrypoints/``, and no
service imports it; the pure core (``shared/domain``, ``shared/config``) touches no IO library."""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """Every module ``path`` imports (absolute names; relative imports resolved against its package)."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                yield node.lineno, ".".join((*base, node.module or ""))
            else:
                yield node.lineno, node.module or ""


def offenders(folder: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted((root / folder).rglob("*.py")):
        for line, name in imports(path, root):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                out.append(f"{path.relative_to(root)}:{line} imports {name}")
    return out


def test_shared_imports_nothing_from_services() -> None:
    assert offenders("shared", ("services",)) == []


def test_no_service_imports_the_composition_root() -> None:
    below = ("entrypoints", "bench", "__pycache__")  # the bench starts needles of its own, as the CLI does
    services = [p.name for p in (ROOT / "services").iterdir() if p.is_dir() and p.name not in below]
    found = [o for s in services for o in offenders(f"services/{s}", ("services.entrypoints",))]
    assert found == []


def test_the_pure_core_touches_no_io() -> None:
    io = ("nats", "asyncpg", "sqlalchemy", "httpx", "fastapi", "uvicorn", "socket", "subprocess", "services")
    assert offenders("shared/domain", io) == []
    assert offenders("shared/config", io) == []


def test_the_walk_finds_an_offending_import(tmp_path: Path) -> None:
    """The check itself can fail: absolute and relative imports of a forbidden package are both seen."""
    (tmp_path / "shared" / "store").mkdir(parents=True)
    (tmp_path / "shared" / "store" / "probe.py").write_text("import os\nfrom services.intake import app\n")
    (tmp_path / "shared" / "store" / "deep.py").write_text("from ...services import router\n")
    assert offenders("shared", ("services",), tmp_path) == ["shared/store/deep.py:1 imports services",
                                                            "shared/store/probe.py:2 imports services.intake"]
