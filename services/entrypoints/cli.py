"""The ``needle`` command line (contract: DESIGN.md, "Contract: CLI")."""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from services.entrypoints.supervisor import Child

from services.entrypoints.nats_users import nats_servers
from shared.files import prepare_data_dir
from shared.settings import Settings

app = typer.Typer(help="needle — 千条线穿进一根针: event-sourced issue escalation for grid governance.",
                  no_args_is_help=True, add_completion=False)
token_app = typer.Typer(help="Bearer tokens for grid workers, handlers, supervisors, integrators, admins.")
rules_app = typer.Typer(help="The rulebook (权责清单).")
report_app = typer.Typer(help="考核 reports (通报).")
keys_app = typer.Typer(help="The residents' data keys (个人信息保护).")
app.add_typer(token_app, name="token")
app.add_typer(report_app, name="report")
app.add_typer(rules_app, name="rules")
app.add_typer(keys_app, name="keys")

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="data directory (default: per-user data dir)")]


def _settings(data_dir: Path | None = None, **overrides: object) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        values["data_dir"] = data_dir
    return Settings(**values)  # type: ignore[arg-type]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"needle: {message}", err=True)
    return typer.Exit(code)


def _child_env(settings: Settings, nats_url: str, database_url: str | None) -> dict[str, str]:
    env = {**os.environ, "NEEDLE_NATS_URL": nats_url, "NEEDLE_DATA_DIR": str(settings.data_dir),
           "NEEDLE_ORG": str(settings.org), "NEEDLE_RULES": str(settings.rules),
           "NEEDLE_HOLIDAYS": str(settings.holidays), "NEEDLE_LOG_LEVEL": settings.log_level,
           "NEEDLE_WORKERS": "1",
           # links the children make (the notifier's 回访 link) point at the HTTP intake of this needle
           "NEEDLE_PUBLIC_URL": settings.public_url or f"http://{settings.host}:{settings.port}"}
    if database_url:
        env["NEEDLE_DATABASE_URL"] = database_url
    return env


def _start_children(settings: Settings, nats_url: str, database_url: str | None,
                    names: tuple[str, ...]) -> list[Child]:
    """Start ``needle run NAME`` for each name, on the same servers and files, and wait until each is
    ready (the projections have migrated their tables; the router follows its consumers)."""
    from services.entrypoints.supervisor import Child

    env = _child_env(settings, nats_url, database_url)
    return _started([Child(name, env, settings.data_dir / "logs" / f"{name}.log") for name in names])


def _started(children: list[Child]) -> list[Child]:
    """Start every child, then wait until each says it is ready."""
    for c in children:
        c.start()
    for c in children:
        c.wait_ready(90)
    return children


def _start_intake_workers(settings: Settings, nats_url: str, database_url: str | None) -> list[Child]:
    """The extra HTTP intake processes of NEEDLE_WORKERS (``intake-2`` ...): each binds the same port with
    SO_REUSEPORT and serves the whole API; they deliver no webhooks (this process does: one deliverer)."""
    from services.entrypoints.supervisor import Child

    assert settings.metrics_dir is not None, "prepare_metrics_dir first"
    env = {**_child_env(settings, nats_url, database_url), "NEEDLE_HOST": settings.host,
           "NEEDLE_PORT": str(settings.port), "NEEDLE_REUSE_PORT": "true", "NEEDLE_WEBHOOK_DELIVERY": "false",
           "NEEDLE_METRICS_DIR": str(settings.metrics_dir)}
    return _started([Child(f"intake-{n}", env, settings.data_dir / "logs" / f"intake-{n}.log", service="intake")
                     for n in range(2, settings.workers + 1)])


def prepare_metrics_dir(settings: Settings) -> None:
    """One directory of Prometheus multiprocess files for the intake workers, emptied at start (files of
    processes gone would count again). Called before the app's modules are imported: prometheus_client
    reads its variable when first imported."""
    import shutil

    path = settings.metrics_dir or settings.data_dir / "metrics"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    settings.metrics_dir = path
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


def write_runtime(settings: Settings, nats_url: str, database_url: str | None, services: tuple[str, ...]) -> None:
    """Where the running needle's servers are, for commands that attach to it (rebuild, rules, backup ...)."""
    from . import datadir

    datadir.write_runtime(settings.data_dir, {
        "pid": os.getpid(), "nats_url": nats_url, "database_url": database_url, "services": list(services),
        "http": f"http://{settings.host}:{settings.port}", "org": str(settings.org), "rules": str(settings.rules)})


def clear_runtime(settings: Settings) -> None:
    from . import datadir

    (settings.data_dir / datadir.RUNTIME_FILE).unlink(missing_ok=True)


def running(settings: Settings) -> dict[str, str] | None:
    """The servers of the needle serving the data dir (or those of NEEDLE_NATS_URL / NEEDLE_DATABASE_URL);
    None when nobody serves it. A runtime.json left by a needle that died is not believed: only a live
    holder of the data dir's lock counts."""
    from . import datadir

    info: dict[str, str] = {}
    if datadir.is_held(settings.data_dir):
        info = datadir.read_runtime(settings.data_dir)
    if settings.nats_url:
        info["nats_url"] = settings.nats_url
    if settings.database_url:
        info["database_url"] = settings.database_url
    return info if info.get("nats_url") else None


def attach(settings: Settings) -> dict[str, str]:
    """URLs of the needle running on the data dir (or NEEDLE_NATS_URL / NEEDLE_DATABASE_URL)."""
    info = running(settings)
    if info is None:
        raise _fail(f"no running needle on {settings.data_dir} (start `needle up`, or set NEEDLE_NATS_URL)")
    return info


def _boot(settings: Settings, services: tuple[str, ...], child_services: tuple[str, ...] = (),
          owner: bool = False, guide: bool = False) -> None:
    """Start embedded servers (unless URLs are given), the ``child_services`` as supervised child
    processes, then run ``services`` in this process until a signal. The ``owner`` (``needle up``)
    writes DIR/runtime.json for the commands that attach to it. The owner, and any process that starts
    servers on the data dir, first takes the data dir's lock: a second one refuses before touching anything."""
    import contextlib

    from .datadir import DataDirBusy, hold

    serves_data_dir = owner or not settings.nats_url
    try:
        with hold(settings.data_dir) if serves_data_dir else contextlib.nullcontext():
            if serves_data_dir:
                clear_runtime(settings)  # what a needle that died left: it named servers that are gone
            _boot_held(settings, services, child_services, owner, guide)
    except DataDirBusy as exc:
        raise _fail(str(exc)) from None


def _boot_held(settings: Settings, services: tuple[str, ...], child_services: tuple[str, ...], owner: bool,
               guide: bool) -> None:
    from shared.logs import configure

    configure(settings.log_level, settings.log_json)
    prepare_data_dir(settings.data_dir)  # 0700, with logs/, nats/, secrets/
    # before the app's modules load: prometheus_client reads PROMETHEUS_MULTIPROC_DIR when first imported
    intake_workers = "intake" in services and settings.workers > 1
    if intake_workers:
        settings.reuse_port = True  # this process and every extra intake worker share the port
        prepare_metrics_dir(settings)
    elif settings.metrics_dir:  # an extra intake worker: the files its parent prepared
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(settings.metrics_dir)

    from services.entrypoints.embedded import EmbeddedNats, EmbeddedPostgres
    from services.entrypoints.loop import run
    from services.entrypoints.stack import Stack, Urls, print_ready, run_stack
    from shared.config import ConfigError
    from shared.privacy.keystore import KekUnavailable

    try:
        stack = Stack.from_settings(settings, Urls(nats=settings.nats_url or "", database=settings.database_url))
    except (ConfigError, KekUnavailable) as exc:
        raise _fail(f"refusing to start: {exc}") from None
    except FileNotFoundError as exc:
        raise _fail(f"refusing to start: {exc}") from None
    embedded_nats = embedded_pg = None
    children: list[Child] = []
    try:
        if not settings.nats_url:
            embedded_nats = EmbeddedNats(settings.data_dir, sync_always=settings.sync_always)
            embedded_nats.start()
            stack.urls.nats = embedded_nats.url
        if not settings.database_url and ("projections" in services or "intake" in services):
            embedded_pg = EmbeddedPostgres(settings.data_dir)
            embedded_pg.start()
            stack.urls.database = embedded_pg.url
        if not settings.database_url and "projections" in child_services and embedded_pg is None:
            embedded_pg = EmbeddedPostgres(settings.data_dir)
            embedded_pg.start()
            stack.urls.database = embedded_pg.url
        if owner:
            write_runtime(settings, stack.urls.nats, stack.urls.database, services + child_services)
        children = _start_children(settings, stack.urls.nats, stack.urls.database, child_services)
        if intake_workers:
            children += _start_intake_workers(settings, stack.urls.nats, stack.urls.database)
        def ready(url: str) -> None:
            print_ready(url)
            if owner:
                print_next_steps(settings, stack.org, url, guide=guide)

        run(run_stack(stack, services=services, on_ready=ready, children=children), settings.event_loop)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        raise _fail(str(exc)) from None
    finally:
        if owner:
            clear_runtime(settings)
        for child in children:
            child.stop()
        if embedded_pg:
            embedded_pg.stop()
        if embedded_nats:
            embedded_nats.stop()


def print_next_steps(settings: Settings, org: Any, url: str, *, guide: bool) -> None:
    """Where to go once needle is up. With ``--demo``: a supervisor's dashboard link that signs in at once (a
    one-day token for the org's root area, printed on this terminal only) and the stories to replay."""
    from shared import auth

    root = next(a.id for a in org.areas.values() if a.parent is None)
    dir_opt = f" --data-dir {settings.data_dir}"
    lines = [f"  dashboard   {url}/dashboard   (a supervisor's token: needle token issue --role supervisor "
             f"--scope area:{root}{dir_opt})",
             f"  API docs    {url}/docs",
             f"  a token     needle token issue --role ROLE --scope area:ID|dept:ID{dir_opt}"]
    if guide:
        token = auth.issue_token(auth.load_or_create_key(settings.data_dir), role="supervisor", scope=f"area:{root}",
                                 subject="demo-supervisor", ttl_s=86400)
        lines = [f"  dashboard   {url}/dashboard#token={token}   (signed in as supervisor of {root}, for a day)",
                 f"  pages       {url}/app/   (grid worker, handler, command centre: needle token issue ... --link)",
                 lines[1], lines[2],
                 f"  the stories needle demo --url {url}{dir_opt}   (the four Zhoushan stories, replayed live)"]
    print("\n".join(lines), flush=True)


@app.command()
def up(
    data_dir: DataDir = None,
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    demo: Annotated[bool, typer.Option("--demo", help="the Zhoushan demo org and rulebook (also the default without "
                                       "--org/--rules), and once ready a supervisor's dashboard link that signs in "
                                       "at once and the command that replays the four stories")] = False,
    org: Annotated[Path | None, typer.Option(help="org tree YAML")] = None,
    rules: Annotated[Path | None, typer.Option(help="rulebook YAML")] = None,
    workers: Annotated[int | None, typer.Option(help="HTTP intake processes on the port (default: "
                                                       "NEEDLE_WORKERS, else 1)", min=1, max=64)] = None,
) -> None:
    """Start everything (embedded NATS + Postgres, intake, router, projections); Ctrl-C stops it all."""
    settings = _settings(data_dir, port=port, org=org, rules=rules, workers=workers)
    if demo and (org or rules):
        raise _fail("--demo loads the Zhoushan org and rulebook; leave out --org/--rules or --demo")
    background = ("router",) + (("projections",) if settings.projections else ())
    if settings.workers_in_process:
        _boot(settings, ("intake", *background), owner=True, guide=demo)
    else:  # the default: the HTTP intake keeps this process; the workers get processes of their own
        _boot(settings, ("intake",), child_services=background, owner=True, guide=demo)


@app.command()
def run(service: Annotated[str, typer.Argument(help="intake | router | projections")],
        data_dir: DataDir = None,
        port: Annotated[int | None, typer.Option(help="HTTP port (default: NEEDLE_PORT, else 8000)")] = None,
        workers: Annotated[int | None, typer.Option(help="intake: HTTP processes on the port (default: "
                                                           "NEEDLE_WORKERS, else 1)", min=1, max=64)] = None) -> None:
    """Run one service alone (scale-out). Needs NEEDLE_NATS_URL (and NEEDLE_DATABASE_URL for projections)."""
    if service not in ("intake", "router", "projections"):
        raise _fail(f"unknown service {service!r} (intake, router, projections)")
    _boot(_settings(data_dir, port=port, workers=workers), (service,))


@token_app.command("issue")
def token_issue(
    role: Annotated[str, typer.Option(help="grid_worker | handler | supervisor | integrator | admin | reporter")],
    scope: Annotated[str, typer.Option(help="area:<id> | dept:<id> | (empty for integrator/admin)")] = "",
    data_dir: DataDir = None,
    ttl: Annotated[str, typer.Option(help="lifetime, ISO 8601 or seconds (default per role: SECURITY.md)")] = "",
    subject: Annotated[str | None, typer.Option(help="who the token stands for (default: a new one, printed)")] = None,
    org: Annotated[Path | None, typer.Option(help="org tree the scope is checked against (default: the running "
                                                   "needle's, else NEEDLE_ORG or the demo org)")] = None,
    link: Annotated[bool, typer.Option("--link", help="also print a sign-in link to the role's page (/app/), as "
                                       "the last line: the token rides in the #fragment, never sent to a server")]
    = False,
) -> None:
    """Print a bearer token that the server using DATA_DIR accepts (the last line of stdout; its scope is
    checked against the org); with ``--link`` the token, then as the last line the URL that signs the person in
    to their page."""
    from shared import auth
    from shared.config import ConfigError, load_org
    from shared.config.loader import parse_duration
    from shared.scopes import check_scope

    settings = _settings(data_dir)
    try:
        ttl_s = None if not ttl else int(ttl) if ttl.isdigit() else int(parse_duration(ttl).total_seconds())
        org_file = org or Path((running(settings) or {}).get("org") or settings.org)
        try:
            check_scope(load_org(org_file), role, scope)
        except ConfigError as exc:
            raise ValueError(f"cannot check the scope against {org_file}: {exc}") from None
        except ValueError as exc:  # say which org: before `needle up`, the default is the demo's (--org FILE)
            raise ValueError(f"{exc} [org: {org_file}]") from None
        plan = auth.plan_token(role, scope, subject, ttl_s)
        key = auth.load_or_create_key(settings.data_dir)
        token = auth.issue_token(key, role=role, scope=scope, subject=plan.subject, ttl_s=plan.ttl_s)
        if plan.generated:
            typer.echo(f"subject: {plan.subject} (--subject {plan.subject} issues another token for it)", err=True)
        typer.echo(token)
        if link:
            typer.echo(sign_in_link(settings, token))
    except ValueError as exc:
        raise _fail(str(exc)) from None


def sign_in_link(settings: Settings, token: str) -> str:
    """``<running needle's http>/app/#token=...``: the fragment stays in the browser (the page moves it to the
    tab's sessionStorage and strips it from the address bar), so no server or proxy log ever sees it."""
    base = (running(settings) or {}).get("http") or f"http://{settings.host}:{settings.port}"
    base = base.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://127.0.0.1:")
    return f"{base.rstrip('/')}/app/#token={token}"


def _jti_of(value: str) -> str:
    """A token id, or the id inside a whole token (read, not verified: revoking needs no proof)."""
    from shared.revocation import check_jti

    if value.count(".") == 2:
        import jwt

        try:
            claims = jwt.decode(value, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise ValueError(f"not a token: {exc}") from None
        value = str(claims.get("jti", ""))
    return check_jti(value)


@token_app.command("revoke")
def token_revoke(
    jti: Annotated[str | None, typer.Argument(help="the token's id (its jti claim), or the token itself")] = None,
    subject: Annotated[str | None, typer.Option(help="revoke every token of this subject issued until now")] = None,
    data_dir: DataDir = None,
) -> None:
    """Refuse a token (or every token of a subject issued until now) on the needle running on DATA_DIR:
    every needle process refuses it within about a second, and after restarts (401 "token revoked")."""
    import time

    import nats

    from shared.store.revocations import open_bucket, revoke_subject, revoke_token

    if (jti is None) == (subject is None):
        raise _fail("give a token id (JTI) or --subject SUB, not both")
    try:
        token_id = _jti_of(jti) if jti is not None else None
        if subject is not None and not subject.strip():
            raise ValueError("--subject must not be empty")
    except ValueError as exc:
        raise _fail(str(exc)) from None
    settings = _settings(data_dir)
    info = attach(settings)
    by = os.environ.get("USER", "cli")

    async def go() -> int:
        nc = await nats.connect(nats_servers(info["nats_url"]), connect_timeout=5, max_reconnect_attempts=1)
        try:
            kv = await open_bucket(nc, settings.stream_replicas)
            if token_id is not None:
                return await revoke_token(kv, token_id, at=time.time(), by=by)
            assert subject is not None
            return await revoke_subject(kv, subject, before=time.time(), by=by)
        finally:
            await nc.close()

    try:
        revision = asyncio.run(go())
    except Exception as exc:  # NATS unreachable: say so, no traceback
        raise _fail(f"could not reach the running needle's NATS: {exc!r}", 1) from None
    what = f"token {token_id}" if token_id is not None else f"every token of {subject!r} issued until now"
    typer.echo(f"revoked {what} (revision {revision})")


@token_app.command("nats")
def token_nats(data_dir: DataDir = None) -> None:
    """Print the read-only NATS URL for integrators of the needle running on DATA_DIR
    (read needle.events.>, own durable consumers; no publishing, no timers)."""
    from urllib.parse import urlsplit

    from services.entrypoints.nats_users import load_or_create_passwords, url_for

    settings = _settings(data_dir)
    info = attach(settings)
    port = urlsplit(nats_servers(info["nats_url"])[0]).port or 4222
    typer.echo(url_for("integrator", load_or_create_passwords(settings.data_dir)["integrator"], port))


@rules_app.command("publish")
def rules_publish(file: Annotated[Path, typer.Argument(help="rulebook YAML", exists=True, dir_okay=False)],
                  data_dir: DataDir = None) -> None:
    """Validate FILE and put it in force at run time (recorded as a rulebook_published event).
    Issues already dispatched keep their deadlines; new reports route by FILE."""
    import nats

    from shared import rulebooks
    from shared.config import ConfigError, load_org, load_rulebook
    from shared.config.crosscheck import check_against_org

    settings = _settings(data_dir)
    try:
        rb = load_rulebook(file)
        info = attach(settings)
        check_against_org(rb, load_org(info.get("org") or settings.org))
    except ConfigError as exc:
        raise _fail(f"refusing to publish: {exc}") from None

    async def go() -> int:
        nc = await nats.connect(nats_servers(info["nats_url"]))
        try:
            return await rulebooks.publish(nc, rb, file.read_text(), str(file), by=os.environ.get("USER", "cli"))
        finally:
            await nc.close()

    seq = asyncio.run(go())
    typer.echo(f"rulebook {rb.version} published at sequence {seq} ({len(rb.categories)} categories)")


@app.command()
def forget(resident: Annotated[str, typer.Argument(help="resident id, or the phone number it was reported with")],
           data_dir: DataDir = None) -> None:
    """个人信息删除: destroy a resident's data key in the running needle (crypto-shredding). The facts stay in
    the stream; the resident's name and phone read "[erased]" everywhere. Idempotent."""
    import nats

    from shared.commanding import utcnow
    from shared.privacy.keystore import ResidentKeys
    from shared.privacy.residents import forget as do_forget

    settings = _settings(data_dir)
    info = attach(settings)

    async def go() -> tuple[str, tuple[str, ...]]:
        nc = await nats.connect(nats_servers(info["nats_url"]))
        try:
            # destroying a key needs no key-encryption key (without it a wrapped key reads as b""): no KMS call,
            # and no KEK file made in a data dir that may not be the running needle's
            keys = ResidentKeys(nc, replicas=settings.stream_replicas)
            await keys.start(watch=False)
            out = await do_forget(nc, keys, resident, by=os.environ.get("USER", "cli"), now=utcnow())
            return out.resident_id, out.key_ids
        finally:
            await nc.close()


    from shared.domain.errors import DomainError

    try:
        resident_id, key_ids = asyncio.run(go())
    except (ValueError, DomainError) as exc:
        raise _fail(str(exc)) from None
    if key_ids:
        typer.echo(f"resident {resident_id} forgotten: key {', '.join(key_ids)} destroyed")
    else:
        typer.echo(f"resident {resident_id}: no key (unknown or already forgotten); nothing to do")


@keys_app.command("rewrap")
def keys_rewrap(data_dir: DataDir = None) -> None:
    """Wrap with the key-encryption key every resident key an earlier needle stored unwrapped, and move keys
    still named by the resident id (r.<id>) to h.<HMAC(id)>, erasing the old messages on disk. Runs against the
    running needle with its KEK (NEEDLE_KEK_COMMAND, or DIR/secrets/resident-kek.key, never made here).
    Safe to stop at any point and to run again; a second run changes nothing."""
    import nats

    from shared.privacy.keystore import KekUnavailable, KeyStoreError, ResidentKeys, load_or_create_kek

    settings = _settings(data_dir)
    info = attach(settings)
    try:
        kek = load_or_create_kek(settings, create=False)  # a KEK made here would not be the running needle's
    except KekUnavailable as exc:
        raise _fail(f"refusing to rewrap: {exc}") from None

    def progress(n: int, total: int, what: str) -> None:
        typer.echo(f"key {n} of {total}: {what}")

    async def go() -> Any:
        nc = await nats.connect(nats_servers(info["nats_url"]))
        try:
            keys = ResidentKeys(nc, replicas=settings.stream_replicas, kek=kek)
            await keys.start(watch=False)
            return await keys.rewrap(progress)
        finally:
            await nc.close()

    from shared.domain.errors import DomainError

    try:
        done = asyncio.run(go())
    except (KeyStoreError, DomainError) as exc:
        raise _fail(f"refusing to rewrap: {exc}") from None
    for why in done.left:
        typer.echo(f"left: {why}", err=True)
    if not done.changed:
        typer.echo("nothing to do: every resident key is wrapped and named by an HMAC of its id"
                   + (f" ({len(done.left)} left, above)" if done.left else ""))
        return
    if not done.checked:
        typer.echo("note: no key wrapped before to check the key-encryption key against (the first ones wrapped)")
    typer.echo(f"{done.total} resident key(s): {done.wrapped} wrapped with the key-encryption key, {done.moved} "
               f"moved from r.<id> to h.<HMAC(id)>; {done.markers} marker(s) naming an id erased; old messages "
               f"erased on disk")


@rules_app.command("check")
def rules_check(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
                org: Annotated[Path | None, typer.Option(help="org tree YAML: check the kinds against it and "
                                                                "print the coverage table")] = None) -> None:
    """Validate a rulebook file without publishing it."""
    from shared.config import ConfigError, load_org, load_rulebook
    from shared.config.crosscheck import cross_check, render_report

    try:
        rb = load_rulebook(file)
        report = cross_check(rb, load_org(org), str(file)) if org else None
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if report is not None:
        typer.echo(render_report(report))
        if not report.ok:
            raise typer.Exit(1)
    typer.echo(f"ok: rulebook {rb.version}, {len(rb.categories)} categories")


@report_app.command("monthly")
def report_monthly(period: Annotated[str, typer.Option("--period", help="the month, YYYY-MM")],
                   area: Annotated[str, typer.Option("--area", help="the area reported on (e.g. putuo)")],
                   out: Annotated[Path, typer.Option("--out", help="directory to write the files to")],
                   data_dir: DataDir = None) -> None:
    """The monthly 通报 of AREA: rankings of departments and areas, the rules version in force in the month and
    the worst overdue cases, as CSV, XLSX and a printable HTML page in OUT."""
    from datetime import datetime

    import nats

    from services.projections import report
    from services.projections.service import open_pool
    from shared import rulebooks
    from shared.config import load_org, load_rulebook
    from shared.domain.errors import DomainError

    settings = _settings(data_dir)
    info = attach(settings)
    if not info.get("database_url"):
        raise _fail("no database URL for the running needle (set NEEDLE_DATABASE_URL)")
    org = load_org(info.get("org") or settings.org)
    if area not in org.areas:
        raise _fail(f"unknown area {area!r}")

    async def go() -> list[Path]:
        nc = await nats.connect(nats_servers(info["nats_url"]))
        pool = await open_pool(info["database_url"])
        try:
            hist = await rulebooks.history(nc)
            if not hist:
                rb = load_rulebook(info.get("rules") or settings.rules)
                hist = [(datetime.min.replace(tzinfo=rb.tz), rb)]
            return report.write(await report.build(pool, org, hist, area=area, period=period), out)
        finally:
            await pool.close()
            await nc.close()

    try:
        files = asyncio.run(go())
    except DomainError as exc:
        raise _fail(str(exc)) from None
    for f in files:
        typer.echo(str(f))


@app.command()
def rebuild(data_dir: DataDir = None,
            projection: Annotated[str, typer.Argument(help="projection to rebuild")] = "read_models") -> None:
    """Replay the stream into fresh read-model tables while the live ones serve, then swap them in."""
    import nats
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from services.projections.rebuild import rebuild as do_rebuild
    from services.projections.schema import PROJECTION
    from services.projections.service import open_pool
    from services.projections.worker import ProjectionWriter
    from shared.config import load_org, load_rulebook

    if projection != PROJECTION:
        raise _fail(f"unknown projection {projection!r} (known: {PROJECTION})")
    settings = _settings(data_dir)
    info = attach(settings)
    if not info.get("database_url"):
        raise _fail("no database URL for the running needle (set NEEDLE_DATABASE_URL)")
    org = load_org(info.get("org") or settings.org)
    rb = load_rulebook(info.get("rules") or settings.rules)

    async def go() -> dict[str, Any]:
        from shared.privacy.issuekeys import issue_keys_for

        nc = await nats.connect(nats_servers(info["nats_url"]))
        pool = await open_pool(info["database_url"])
        try:
            texts = await issue_keys_for(nc, settings)
            with Progress(TextColumn("rebuild"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
                          TextColumn("{task.fields[rate]:,.0f} events/s"), TimeRemainingColumn()) as bar:
                task = bar.add_task("rebuild", total=1, rate=0.0)

                def progress(done: int, target: int, rate: float) -> None:
                    bar.update(task, completed=done, total=target, rate=rate)

                return await do_rebuild(pool, nc.jetstream(), ProjectionWriter(org, rb.tz), progress,
                                        database_url=info["database_url"], texts=texts)
        finally:
            await pool.close()
            await nc.close()

    result = asyncio.run(go())
    typer.echo(f"rebuilt {result['events']:,.0f} events in {result['seconds']} s "
               f"({result['events_per_s']:,.0f} events/s); tables swapped")


@app.command()
def demo(
    url: Annotated[str, typer.Option(help="base URL of a running needle")] = "http://127.0.0.1:8000",
    data_dir: DataDir = None,
    fast: Annotated[bool, typer.Option("--fast", help="no pauses between steps")] = False,
) -> None:
    """Replay the four Zhoushan stories against a running `needle up --demo --data-dir DIR`."""
    from services.demo.cli import run_demo

    raise typer.Exit(run_demo(url, _settings(data_dir).data_dir, fast=fast))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench(ctx: typer.Context) -> None:
    """Benchmarks as ratios to a same-run baseline: `needle bench intake|router [--help]`."""
    from services.bench.cli import main as bench_main

    bench_main(list(ctx.args))


from services.entrypoints import cli_ops  # noqa: E402  (its commands use the helpers above)

app.command()(cli_ops.backup)
app.command()(cli_ops.restore)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
