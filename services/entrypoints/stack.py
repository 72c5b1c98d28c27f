"""The composition root: builds every part from Settings and runs them in one process
(``needle up``) or one service alone (``needle run SERVICE``)."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import structlog
import uvicorn
from nats.aio.client import Client as NATS

from services.intake.app import create_app
from services.intake.context import AppContext
from services.intake.observability import LagMonitor
from services.integrations import webhooks_api
from services.integrations.webhooks import WebhookService, start_webhooks
from services.media.store import MediaStore
from services.notify.service import NotifyService, start_notifier
from services.projections.retention import RetentionSweeper
from services.projections.service import ReadModels, start_projections, start_read_api
from services.projections.worker import ProjectionWorker
from services.router.service import Router, start_router
from shared import auth
from shared.config import OrgTree, Rulebook, load_org, load_rulebook
from shared.config.crosscheck import check_against_org
from shared.domain.calendar import WorkCalendar, load_holiday_file
from shared.domain.clocks import SlaClocks
from shared.lifecycle import Lifecycle
from shared.privacy.issuekeys import IssueKeys
from shared.privacy.keystore import ResidentKeys, load_or_create_kek
from shared.revocation import Revocations
from shared.settings import Settings
from shared.store.eventstore import JetStreamEventStore
from shared.store.settling import settled
from shared.store.streams import StreamOptions, ensure_streams

from .corked import CorkedHttpToolsProtocol
from .nats_users import nats_servers

log = structlog.get_logger("needle.stack")


@dataclass
class Urls:
    nats: str
    database: str | None


def sla_clocks(settings: Settings, rulebook: Rulebook) -> SlaClocks:
    """The SLA clock arithmetic every service of the process shares: the rulebook's calendar with the
    holiday file's years beyond the bundled ones."""
    holidays = load_holiday_file(settings.holidays) if settings.holidays.exists() else None
    return SlaClocks(WorkCalendar(rulebook.calendar, holidays))


@dataclass
class Stack:
    """One process's services, each started by its own ``start_*`` function with the parts it needs, and the
    handles they return. The lifecycle holds their tasks, health flags and closers."""
    settings: Settings
    urls: Urls
    org: OrgTree
    rulebook: Rulebook
    clocks: SlaClocks
    life: Lifecycle = field(default_factory=Lifecycle)
    nc: NATS | None = None
    store: JetStreamEventStore | None = None
    residents: ResidentKeys | None = None
    issue_keys: IssueKeys | None = None  # the issues' data keys: free text is sealed in the stream
    revocations: Revocations = field(default_factory=Revocations)  # followed from NEEDLE_REVOKED
    router: Router | None = None
    read_models: ReadModels | None = None
    projection_worker: ProjectionWorker | None = None  # when the projections run in this process
    webhooks: WebhookService | None = None
    notifier: NotifyService | None = None  # with the router, when NEEDLE_NOTIFY_URL is set
    lag: LagMonitor | None = None
    retention: RetentionSweeper | None = None  # with the projections: shreds closed issues' text past retention
    # the data keys' key-encryption key, got once per process before anything starts (NEEDLE_KEK_COMMAND or
    # DIR/secrets/resident-kek.key: keystore.load_or_create_kek); held in memory only
    kek: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings, urls: Urls) -> Stack:
        org, rulebook = load_org(settings.org), load_rulebook(settings.rules)
        # a kind the org lacks refuses to start (ConfigError); one some owner areas cannot reach is a warning
        warnings = check_against_org(rulebook, org)
        if warnings:
            log.warning("rulebook and org: kinds some owner areas cannot reach (their issues go to the fallback "
                        "or lose a co-handler)", warnings=len(warnings), first=str(warnings[0]),
                        all_of_them=f"needle rules check {settings.rules} --org {settings.org}")
        # no key-encryption key (the KMS command failed, ...) refuses to start (KekUnavailable), before any server
        return cls(settings=settings, urls=urls, org=org, rulebook=rulebook, clocks=sla_clocks(settings, rulebook),
                   kek=load_or_create_kek(settings))

    @property
    def health(self) -> dict[str, bool]:
        return self.life.health

    def _connection(self) -> tuple[NATS, JetStreamEventStore]:
        assert self.nc is not None and self.store is not None, "connect() first"
        return self.nc, self.store

    async def connect(self) -> None:
        health = self.life.health

        async def disconnected() -> None:
            health["nats"] = False

        async def reconnected() -> None:
            health["nats"] = True

        # a server that hangs (SIGSTOP, a frozen VM) keeps its TCP connection open: pings find it within
        # ~3 intervals and the client moves to another node of the cluster
        self.nc = nc = await nats.connect(nats_servers(self.urls.nats), name="needle", max_reconnect_attempts=-1,
                                          reconnect_time_wait=0.5, disconnected_cb=disconnected,
                                          reconnected_cb=reconnected, pending_size=64 * 1024 * 1024,
                                          ping_interval=self.settings.nats_ping_interval_s, max_outstanding_pings=2)
        health["nats"] = True
        within = self.settings.start_timeout_s  # see shared/store/settling.py
        options = StreamOptions(replicas=self.settings.stream_replicas,
                                duplicate_window_s=self.settings.duplicate_window_s)
        await settled("streams", lambda: ensure_streams(nc, options), within_s=within)
        kek = self.kek
        self.residents = ResidentKeys(nc, replicas=self.settings.stream_replicas, kek=kek)
        await self.residents.start(settle_s=within)
        self.life.on_close(self.residents.close)
        self.issue_keys = IssueKeys(nc, kek=kek, replicas=self.settings.stream_replicas)
        await self.issue_keys.start(settle_s=within)
        self.life.on_close(self.issue_keys.close)
        self.store = JetStreamEventStore(nc, texts=self.issue_keys)
        await self.store.start()
        await self._follow_revocations()
        await self._rules_in_force()

    async def _follow_revocations(self) -> None:
        """Every revoked token known before this returns; later revocations as they are written."""
        from shared.store.revocations import RevocationFollower, open_bucket

        nc, _ = self._connection()
        bucket = await settled("revocations bucket", lambda: open_bucket(nc, self.settings.stream_replicas),
                               within_s=self.settings.start_timeout_s)
        follower = RevocationFollower(bucket, self.revocations, health=self.health)
        await follower.start()
        self.life.on_close(follower.stop)

    async def _rules_in_force(self) -> None:
        """The rulebook file takes effect unless it is already the newest one recorded; then follow
        every later ``needle rules publish``."""
        from shared import rulebooks

        nc, _ = self._connection()
        newest = await settled("rulebook", lambda: rulebooks.latest(nc), within_s=self.settings.start_timeout_s)
        if newest is not None and newest[0].version == self.rulebook.version:
            after = newest[1]
        else:
            after = await rulebooks.publish(nc, self.rulebook, self.settings.rules.read_text(),
                                            str(self.settings.rules), by="needle up")
        self.life.spawn("rules", rulebooks.follow(nc, after, self.apply_rulebook))

    def apply_rulebook(self, rulebook: Rulebook) -> None:
        """Put a newly published rulebook in force everywhere in this process."""
        self.rulebook = rulebook
        self.life.apply_rulebook(rulebook)

    async def start(self, services: tuple[str, ...], *, read_api: bool = False) -> None:
        """Start ``services`` (any of intake, router, projections) in this process, after connect(). With
        ``read_api`` and no projections here, the intake serves the read models another process keeps."""
        if "projections" in services:
            await self.start_projections()
        elif read_api:
            await self.start_read_api()
        if "router" in services:
            await self.start_router()
            if self.settings.notify_url:
                await self.start_notifier()
        if "intake" in services:
            await self.start_webhooks()

    async def start_router(self) -> Router:
        nc, store = self._connection()
        self.router = await start_router(self.life, nc, store, self.org, self.rulebook, self.clocks, self.settings)
        return self.router

    async def start_notifier(self) -> NotifyService:
        nc, store = self._connection()
        self.notifier = await start_notifier(self.life, nc, store, self.org, self.rulebook, self.settings,
                                             self.residents)
        return self.notifier

    async def start_projections(self) -> ProjectionWorker:
        nc, _ = self._connection()
        assert self.urls.database, "the projections need a database"
        self.read_models, self.projection_worker = await start_projections(self.life, nc, self.org, self.rulebook,
                                                                           self.urls.database, self.issue_keys)
        if self.store is not None and self.issue_keys is not None:  # one per needle: where the projections run
            self.retention = RetentionSweeper(self.read_models.pool, self.store, self.issue_keys,
                                              lambda: self.rulebook, every_s=self.settings.retention_sweep_s)
            self.life.spawn("retention", self.retention.run())
        return self.projection_worker

    async def start_read_api(self) -> ReadModels:
        assert self.urls.database, "the read models need a database"
        self.read_models = await start_read_api(self.life, self.urls.database)
        return self.read_models

    async def start_webhooks(self) -> WebhookService:
        nc, _ = self._connection()
        self.webhooks = await start_webhooks(self.life, nc, self.org, self.settings, texts=self.issue_keys)
        return self.webhooks

    def build_app(self) -> Any:
        nc, store = self._connection()
        key = auth.load_or_create_key(self.settings.data_dir)
        if self.lag is None:  # read from JetStream and the checkpoint: see observability.py
            self.lag = LagMonitor(nc, self.read_models.progress if self.read_models else None, self.settings)
            # not a health component: sampling trouble is logged (observability.py), nothing is down
            self.life.tasks.append(asyncio.create_task(self.lag.run(), name="lag-monitor"))
        ctx = AppContext(settings=self.settings, org=self.org, rulebook=self.rulebook, store=store,
                         verifier=auth.TokenVerifier(key, revocations=self.revocations), clocks=self.clocks, nc=nc,
                         residents=self.residents, health=self.life.health, read_models=self.read_models,
                         webhooks=self.webhooks, lag=self.lag, limiter=AppContext.limiter_for(self.settings),
                         media=MediaStore(nc, replicas=self.settings.stream_replicas))
        routers: tuple[Any, ...] = self.read_models.routers if self.read_models else ()
        if self.webhooks is not None:
            routers += (webhooks_api.router,)

        def hold(rb: Rulebook) -> None:
            ctx.rulebook = rb

        self.life.on_rulebook(hold)
        return create_app(ctx, routers)

    async def close(self) -> None:
        await self.life.close()
        if self.nc is not None:  # bounded: a NATS that is gone must not keep the process alive
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5)
            with contextlib.suppress(Exception):
                await self.nc.close()


def http_config(app: Any, host: str, port: int) -> uvicorn.Config:
    """How needle serves HTTP (the tests' servers too): uvicorn on the corked httptools protocol, no access log
    (requests are logged by the app, with their trace id), no ``Server: uvicorn`` header (it tells an attacker
    what to look up, nothing to a client), and no proxy-headers layer: it rewrote the client address and scheme
    from ``X-Forwarded-*`` on every request, and needle reads neither (ids, links and limits never depend on
    them), so a proxy in front changes nothing."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                          timeout_graceful_shutdown=5, http=CorkedHttpToolsProtocol, server_header=False,
                          proxy_headers=False)


def _freeze_startup_heap() -> None:
    """Once started: the modules, app, org tree and rulebook live as long as the process, yet every full
    collection walked them again (a pause in the middle of serving). Move them out of the collector's sight."""
    gc.collect()
    gc.freeze()


async def run_stack(stack: Stack, *, services: tuple[str, ...], on_ready: Callable[[str], None],
                    children: list[Any] | None = None) -> None:
    """Run the chosen services in this process until SIGINT/SIGTERM; ``children`` (already started
    child processes, see supervisor.py) are watched and restarted while it runs."""
    await stack.connect()
    await stack.start(services, read_api="intake" in services and bool(stack.urls.database))
    if children:
        from .supervisor import supervise

        stack.life.spawn("supervisor", supervise(children, stack.life.health))
    try:
        if "intake" in services:
            s = stack.settings
            config = http_config(stack.build_app(), s.host, s.port)
            server = uvicorn.Server(config)
            sockets = [reuse_port_socket(s.host, s.port)] if s.reuse_port else None
            # our own signal handling: uvicorn's re-raises SIGTERM after serve() returns, which would kill
            # the process before the workers are stopped and NATS drained
            server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))

            async def announce() -> None:
                while not server.started:
                    if server.should_exit:
                        return
                    await asyncio.sleep(0.05)
                _freeze_startup_heap()
                on_ready(f"http://{s.host}:{s.port}")

            announcer = asyncio.create_task(announce())
            await server.serve(sockets=sockets)
            announcer.cancel()
        else:
            _freeze_startup_heap()
            on_ready("(no HTTP)")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    finally:
        await stack.close()


def print_ready(url: str) -> None:
    print(f"needle ready {url}", flush=True)
    sys.stdout.flush()


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket with SO_REUSEPORT: every intake worker binds one on the same port and the
    kernel spreads new connections over them (NEEDLE_WORKERS)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock
