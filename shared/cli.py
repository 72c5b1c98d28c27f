"""The ``needle`` command line (contract: DESIGN.md, "Contract: CLI")."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from shared.settings import Settings

app = typer.Typer(help="needle — 千条线穿进一根针: event-sourced issue escalation for grid governance.",
                  no_args_is_help=True, add_completion=False)
token_app = typer.Typer(help="Bearer tokens for grid workers, handlers, supervisors, integrators, admins.")
rules_app = typer.Typer(help="The rulebook (权责清单).")
app.add_typer(token_app, name="token")
app.add_typer(rules_app, name="rules")

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="data directory (default: per-user data dir)")]


def _settings(data_dir: Path | None = None, **overrides: object) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        values["data_dir"] = data_dir
    return Settings(**values)  # type: ignore[arg-type]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"needle: {message}", err=True)
    return typer.Exit(code)


def _boot(settings: Settings, services: tuple[str, ...]) -> None:
    """Start embedded servers (unless URLs are given), then run ``services`` until a signal."""
    from shared.config import ConfigError
    from shared.logs import configure
    from shared.runtime.embedded import EmbeddedNats, EmbeddedPostgres
    from shared.runtime.stack import Stack, Urls, print_ready, run_stack

    configure(settings.log_level, settings.log_json)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        stack = Stack.from_settings(settings, Urls(nats=settings.nats_url or "", database=settings.database_url))
    except ConfigError as exc:
        raise _fail(f"refusing to start: {exc}") from None
    except FileNotFoundError as exc:
        raise _fail(f"refusing to start: {exc}") from None
    embedded_nats = embedded_pg = None
    try:
        if not settings.nats_url:
            embedded_nats = EmbeddedNats(settings.data_dir, sync_always=settings.sync_always)
            embedded_nats.start()
            stack.urls.nats = embedded_nats.url
        if not settings.database_url and ("projections" in services or "intake" in services):
            embedded_pg = EmbeddedPostgres(settings.data_dir)
            embedded_pg.start()
            stack.urls.database = embedded_pg.url
        asyncio.run(run_stack(stack, services=services, on_ready=print_ready))
    except KeyboardInterrupt:
        pass
    finally:
        if embedded_pg:
            embedded_pg.stop()
        if embedded_nats:
            embedded_nats.stop()


@app.command()
def up(
    data_dir: DataDir = None,
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    demo: Annotated[bool, typer.Option("--demo", help="load the Zhoushan demo org and rulebook")] = False,
    org: Annotated[Path | None, typer.Option(help="org tree YAML")] = None,
    rules: Annotated[Path | None, typer.Option(help="rulebook YAML")] = None,
) -> None:
    """Start everything (embedded NATS + Postgres, intake, router, projections); Ctrl-C stops it all."""
    settings = _settings(data_dir, port=port, org=org, rules=rules)
    if demo and (org or rules):
        raise _fail("--demo loads the Zhoushan org and rulebook; leave out --org/--rules or --demo")
    services = ("intake", "router") + (("projections",) if settings.projections else ())
    _boot(settings, services)


@app.command()
def run(service: Annotated[str, typer.Argument(help="intake | router | projections")],
        data_dir: DataDir = None, port: Annotated[int, typer.Option()] = 8000) -> None:
    """Run one service alone (scale-out). Needs NEEDLE_NATS_URL (and NEEDLE_DATABASE_URL for projections)."""
    if service not in ("intake", "router", "projections"):
        raise _fail(f"unknown service {service!r} (intake, router, projections)")
    _boot(_settings(data_dir, port=port), (service,))


@token_app.command("issue")
def token_issue(
    role: Annotated[str, typer.Option(help="grid_worker | handler | supervisor | integrator | admin")],
    scope: Annotated[str, typer.Option(help="area:<id> | dept:<id> | (empty for integrator/admin)")] = "",
    data_dir: DataDir = None,
    ttl: Annotated[str, typer.Option(help="lifetime, ISO 8601 (P30D) or seconds")] = "P30D",
    subject: Annotated[str | None, typer.Option(help="who the token stands for (default: role:scope)")] = None,
) -> None:
    """Print a bearer token that the server using DATA_DIR accepts."""
    from shared import auth
    from shared.config.loader import parse_duration

    settings = _settings(data_dir)
    try:
        ttl_s = int(ttl) if ttl.isdigit() else int(parse_duration(ttl).total_seconds())
        key = auth.load_or_create_key(settings.data_dir)
        typer.echo(auth.issue_token(key, role=role, scope=scope, subject=subject, ttl_s=ttl_s))
    except ValueError as exc:
        raise _fail(str(exc)) from None


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
