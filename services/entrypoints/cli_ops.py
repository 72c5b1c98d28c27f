"""``needle backup`` and ``needle restore`` (registered on the ``needle`` app in cli.py)."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from services.entrypoints.nats_users import nats_servers
from shared.settings import Settings

# the same option as cli.py's (cli.py is imported lazily: `python -m services.entrypoints.cli` runs it as
# __main__, and a module-level import from here would load a second, half-initialised copy)
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="data directory (default: per-user data dir)")]


@contextlib.contextmanager
def _servers(settings: Settings, *, database: bool) -> Iterator[dict[str, str]]:
    """URLs of the needle on the data dir: the running one, or embedded servers started on the data
    dir just for this command (stopped when it ends), while it holds the data dir's lock."""
    from services.entrypoints.cli import _fail, running
    from services.entrypoints.datadir import DataDirBusy, hold
    from services.entrypoints.embedded import EmbeddedNats, EmbeddedPostgres

    info = running(settings)
    if info is not None:
        yield info
        return
    with contextlib.ExitStack() as servers:
        try:
            servers.enter_context(hold(settings.data_dir))
        except DataDirBusy as exc:  # a needle started since we looked
            raise _fail(f"{exc}; try again") from None
        n = EmbeddedNats(settings.data_dir, sync_always=settings.sync_always)
        n.start()
        servers.callback(n.stop)
        urls = {"nats_url": n.url}
        if database:
            if settings.database_url:
                urls["database_url"] = settings.database_url
            else:
                pg = EmbeddedPostgres(settings.data_dir)
                pg.start()
                servers.callback(pg.stop)
                urls["database_url"] = pg.url
        yield urls


def _bytes_bar() -> Any:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    return Progress(TextColumn("{task.description:<28}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())


def backup(target: Annotated[Path, typer.Argument(help="directory to write the backup to (empty or new)")],
           data_dir: DataDir = None,
           no_consumers: Annotated[bool, typer.Option("--no-consumers", help="leave the consumers out")] = False,
           no_resident_keys: Annotated[bool, typer.Option(
               "--no-resident-keys", help="leave the residents' data keys out (a restore cannot read residents)")
           ] = False) -> None:
    """Snapshot every stream needle owns (events, timers, webhook buckets) into TARGET with a manifest
    (configs, states, sha256). Works against a running `needle up` or on a stopped data dir."""
    import nats

    from services.entrypoints.cli import _fail, _settings, running
    from services.ops.backup import BackupError
    from services.ops.backup import backup as do_backup

    settings = _settings(data_dir)
    if running(settings) is None and not (settings.data_dir / "nats").exists():
        raise _fail(f"no needle data in {settings.data_dir}")

    async def go(url: str) -> dict[str, Any]:
        nc = await nats.connect(nats_servers(url))
        try:
            with _bytes_bar() as bar:
                def announce(name: str, total: int) -> Any:
                    task = bar.add_task(name, total=max(total, 1))
                    return lambda n: bar.advance(task, n)

                return await do_backup(nc, target, announce=announce, consumers=not no_consumers,
                                       resident_keys=not no_resident_keys)
        finally:
            await nc.close()

    try:
        with _servers(settings, database=False) as info:
            manifest = asyncio.run(go(info["nats_url"]))
    except BackupError as exc:
        raise _fail(str(exc)) from None
    _echo_streams(manifest, sizes=True)
    typer.echo(f"backup written to {target}")

def _echo_streams(manifest: dict[str, Any], *, sizes: bool) -> None:
    """One line a stream of a backup manifest: messages, sequence range (and the file's size)."""
    for e in manifest["streams"]:
        st = e["state"]
        size = f", {e['size']:,} bytes" if sizes else ""
        typer.echo(f"{e['name']}: {st.get('messages', 0):,} messages, sequences {st.get('first_seq')}.."
                   f"{st.get('last_seq')}{size}")



def restore(source: Annotated[Path, typer.Argument(help="a directory written by `needle backup`")],
            data_dir: DataDir = None,
            force: Annotated[bool, typer.Option("--force", help="delete existing streams first")] = False,
            org: Annotated[Path | None, typer.Option(help="org tree YAML for the read models")] = None,
            rules: Annotated[Path | None, typer.Option(help="rulebook YAML (its time zone)")] = None) -> None:
    """Restore a backup into an empty needle (refuses existing streams unless --force), then rebuild
    the read models from the restored events. Meant for a stopped needle: start `needle up` after."""
    import nats
    from rich.progress import BarColumn, Progress, TextColumn

    from services.entrypoints.cli import _fail, _settings
    from services.ops.backup import BackupError, read_manifest, rebuild_read_models
    from services.ops.backup import restore as do_restore
    from shared.config import ConfigError, load_org, load_rulebook
    from shared.privacy.issuekeys import issue_keys_for
    from shared.privacy.keystore import KEK_FILE, KekUnavailable, KeyStoreError, load_or_create_kek

    settings = _settings(data_dir, org=org, rules=rules)
    try:
        read_manifest(source)
        org_tree, rb = load_org(settings.org), load_rulebook(settings.rules)
    except (BackupError, ConfigError) as exc:
        raise _fail(str(exc)) from None
    try:  # the data keys in the backup open only with the KEK they were wrapped with: before anything is touched
        load_or_create_kek(settings, create=False)
    except KekUnavailable as exc:
        raise _fail(f"{exc}. A backup holds the data keys wrapped with the key-encryption key of the needle it "
                    f"came from, kept apart from it: copy that needle's {KEK_FILE} to {settings.data_dir / KEK_FILE} "
                    "(0600), or set NEEDLE_KEK_COMMAND, then restore") from None

    async def go(info: dict[str, str]) -> tuple[dict[str, Any], dict[str, float]]:
        nc = await nats.connect(nats_servers(info["nats_url"]))
        try:
            with _bytes_bar() as bar:
                def announce(name: str, total: int) -> Any:
                    task = bar.add_task(name, total=max(total, 1))
                    return lambda n: bar.advance(task, n)

                manifest = await do_restore(nc, source, force=force, announce=announce)
            with Progress(TextColumn("{task.description:<28}"), BarColumn(),
                          TextColumn("{task.completed:,.0f}/{task.total:,.0f} messages")) as bar:
                task = bar.add_task("read models", total=1)

                def rebuilt(done: int, target: int, rate: float) -> None:
                    bar.update(task, completed=done, total=max(target, 1))

                texts = await issue_keys_for(nc, settings)
                try:
                    figures = await rebuild_read_models(nc, info["database_url"], org_tree, rb.tz, rebuilt, texts)
                except KeyStoreError as exc:  # the backup's keys are wrapped with another needle's KEK
                    raise BackupError(f"streams restored, read models not rebuilt: {exc}. Copy {KEK_FILE} of the "
                                      f"needle the backup came from to {settings.data_dir / KEK_FILE}, then run "
                                      "`needle rebuild`") from None
            return manifest, figures
        finally:
            await nc.close()

    try:
        with _servers(settings, database=True) as info:
            if not info.get("database_url"):
                raise _fail("no database URL for the running needle (set NEEDLE_DATABASE_URL)")
            manifest, figures = asyncio.run(go(info))
    except BackupError as exc:
        raise _fail(str(exc)) from None
    _echo_streams(manifest, sizes=False)
    if manifest.get("forgotten_again"):
        typer.echo(f"{manifest['forgotten_again']} forgotten residents' keys destroyed again")
    if manifest.get("shredded_again"):
        typer.echo(f"{manifest['shredded_again']} shredded issues' keys destroyed again")
    typer.echo(f"restored from {source}; read models rebuilt ({figures['events']:,.0f} events)")
