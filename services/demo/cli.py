"""``needle demo``: replay the four stories against a running needle (``needle up --demo --data-dir DIR``)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from rich.console import Console

from shared import auth

from .stories import run_stories

PACE = 0.35  # seconds between steps, so that a person can follow; --fast drops it


class Tokens:
    """Mints tokens with the key of the server's data directory (``needle token issue`` does the same)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._cache: dict[tuple[str, str, str | None], str] = {}

    def __call__(self, role: str, scope: str = "", subject: str | None = None) -> str:
        k = (role, scope, subject)
        if k not in self._cache:
            self._cache[k] = auth.issue_token(self._key, role=role, scope=scope, subject=subject, ttl_s=3600)
        return self._cache[k]


async def _preflight(url: str, tokens: Tokens, data_dir: Path) -> str | None:
    """Why the demo cannot run against ``url`` (unreachable, tokens refused), or None."""
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as c:
            r = await c.get("/healthz")
            if r.status_code not in (200, 503):
                return f"{url}/healthz answered {r.status_code}: is this a needle?"
            r = await c.get("/v1/issues/0", headers={"Authorization": f"Bearer {tokens('admin')}"})
    except httpx.HTTPError as exc:
        return f"cannot reach needle at {url} ({type(exc).__name__}); start it with `needle up --demo --data-dir DIR`"
    if r.status_code == 401:
        return f"the needle at {url} refuses tokens signed with the key in {data_dir}: does it use that --data-dir?"
    return None


def run_demo(url: str, data_dir: Path, fast: bool = False, console: Console | None = None) -> int:
    """0 when every story ends with its issues closed, 1 when not, 2 when the demo cannot start."""
    console = console or Console()
    if not auth.key_path(data_dir).exists():
        console.print(f"[red]needle demo: no token key in {data_dir}; pass the --data-dir that `needle up` uses[/red]")
        return 2
    tokens = Tokens(auth.load_or_create_key(data_dir))
    problem = asyncio.run(_preflight(url, tokens, data_dir))
    if problem:
        console.print(f"[red]needle demo: {problem}[/red]")
        return 2
    result = asyncio.run(run_stories(url, tokens, console, pace=0.0 if fast else PACE))
    return 0 if result.all_closed else 1
