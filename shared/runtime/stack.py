"""The composition root: builds every part from Settings and runs them in one process
(``needle up``) or one service alone (``needle run SERVICE``)."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import structlog
import uvicorn
from nats.aio.client import Client as NATS

from shared import auth
from shared.config import OrgTree, Rulebook, load_org, load_rulebook
from shared.privacy.keystore import ResidentKeys, load_or_create_kek
from shared.revocation import Revocations
from shared.settings import Settings
from shared.store.eventstore import JetStreamEventStore
from shared.store.settling import settled
from shared.store.streams import StreamOptions, ensure_streams

from .corked import CorkedHttpToolsProtocol
from .nats_users import nats_servers

log = structlog.get_logger("needle.stack")
TASK_STOP_S = 5.0  # how long close() waits for its cancelled tasks


@dataclass
class Urls:
    nats: str
    database: str | None


@dataclass
class Stack:
    settings: Settings
    urls: Urls
    org: OrgTree
    rulebook: Rulebook
    nc: NATS | None = None
    store: JetStreamEventStore | None = None
    residents: ResidentKeys | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    health: dict[str, bool] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    rule_holders: list[Callable[[Rulebook], None]] = field(default_factory=list)
    revocations: Revocations = field(default_factory=Revocations)  # followed from NEEDLE_REVOKED

    @classmethod
    def from_settings(cls, settings: Settings, urls: Urls) -> Stack:
        return cls(settings=settings, urls=urls, org=load_org(settings.org), rulebook=load_rulebook(settings.rules))

    async def connect(self) -> None:
        async def disconnected() -> None:
            self.health["nats"] = False

        async def reconnected() -> None:
            self.health["nats"] = True

        # a server that hangs (SIGSTOP, a frozen VM) keeps its TCP connection open: pings find it within
        # ~3 intervals and the client moves to another node of the cluster
        self.nc = await nats.connect(nats_servers(self.urls.nats), name="needle", max_reconnect_attempts=-1,
                                     reconnect_time_wait=0.5, disconnected_cb=disconnected,
                                     reconnected_cb=reconnected, pending_size=64 * 1024 * 1024,
                                     ping_interval=self.settings.nats_ping_interval_s, max_outstanding_pings=2)
        self.health["nats"] = True
        self.extras["nc"] = self.nc
        nc, within = self.nc, self.settings.start_timeout_s  # see shared/store/settling.py
        options = StreamOptions(replicas=self.settings.stream_replicas,
                                duplicate_window_s=self.settings.duplicate_window_s)
        await settled("streams", lambda: ensure_streams(nc, options), within_s=within)
        self.store = JetStreamEventStore(self.nc)
        await self.store.start()
        self.residents = ResidentKeys(self.nc, replicas=self.settings.stream_replicas,
                                      kek=load_or_create_kek(self.settings.data_dir))
        await self.residents.start(settle_s=within)
        self.closers.append(self.residents.close)
        await self._follow_revocations()
        await self._rules_in_force()

    async def _follow_revocations(self) -> None:
        """Every revoked token known before this returns; later revocations as they are written."""
        from shared.store.revocations import RevocationFollower, open_bucket

        nc = self.nc
        assert nc is not None
        bucket = await settled("revocations bucket", lambda: open_bucket(nc, self.settings.stream_replicas),
                               within_s=self.settings.start_timeout_s)
        follower = RevocationFollower(bucket, self.revocations, health=self.health)
        await follower.start()
        self.closers.append(follower.stop)

    async def _rules_in_force(self) -> None:
        """The rulebook file takes effect unless it is already the newest one recorded; then follow
        every later ``needle rules publish``."""
        from shared import rulebooks

        nc = self.nc
        assert nc is not None
        newest = await settled("rulebook", lambda: rulebooks.latest(nc), within_s=self.settings.start_timeout_s)
        if newest is not None and newest[0].version == self.rulebook.version:
            after = newest[1]
        else:
            after = await rulebooks.publish(nc, self.rulebook, self.settings.rules.read_text(),
                                            str(self.settings.rules), by="needle up")
        self.spawn("rules", rulebooks.follow(nc, after, self.apply_rulebook))

    def apply_rulebook(self, rulebook: Rulebook) -> None:
        """Put a newly published rulebook in force everywhere in this process."""
        self.rulebook = rulebook
        for holder in self.rule_holders:
            holder(rulebook)

    def close_on_exit(self, sub: Any) -> None:
        """Unsubscribe ``sub`` before draining: a pull subscription cancelled mid-fetch otherwise holds
        the drain until its timeout."""
        self.closers.append(sub.unsubscribe)

    def spawn(self, name: str, coro: Awaitable[Any]) -> None:
        async def guarded() -> None:
            self.health[name] = True
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker crashed", worker=name)
                self.health[name] = False
                raise

        self.tasks.append(asyncio.create_task(guarded(), name=name))

    async def start_router(self) -> None:
        from services.router.service import start_router

        await start_router(self)

    async def start_projections(self) -> None:
        from services.projections.service import start_projections

        await start_projections(self)

    async def start_webhooks(self) -> None:
        from services.integrations.webhooks import start_webhooks

        await start_webhooks(self)

    def build_app(self) -> Any:
        from services.intake.app import create_app
        from services.intake.context import AppContext
        from services.intake.observability import LagMonitor

        key = auth.load_or_create_key(self.settings.data_dir)
        assert self.store is not None and self.nc is not None
        if "lag" not in self.extras:  # read from JetStream and the checkpoint: see observability.py
            monitor = LagMonitor(self.nc, self.extras.get("projection"), self.settings)
            self.extras["lag"] = monitor
            self.tasks.append(asyncio.create_task(monitor.run(), name="lag-monitor"))
        ctx = AppContext(settings=self.settings, org=self.org, rulebook=self.rulebook, store=self.store,
                         verifier=auth.TokenVerifier(key, revocations=self.revocations), residents=self.residents,
                         health=self.health, extras=self.extras, limiter=AppContext.limiter_for(self.settings))
        routers = tuple(self.extras.get("routers", ()))

        def hold(rb: Rulebook) -> None:
            ctx.rulebook = rb

        self.rule_holders.append(hold)
        return create_app(ctx, routers)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.tasks:
            # bounded: a cancellation can be lost inside a library (seen: the rulebook follower, cancelled while its
            # subscription was being created, went on waiting for messages); closing the connection below ends it
            done, stuck = await asyncio.wait(self.tasks, timeout=TASK_STOP_S)
            for t in done:
                if not t.cancelled():
                    t.exception()  # retrieved: guarded() logged it when it crashed
            for t in stuck:
                log.warning("a task did not stop when cancelled; closing the connection ends it", task=t.get_name())
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closer(), 5)
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
    if "projections" in services:
        await stack.start_projections()
    elif "intake" in services and stack.urls.database:
        from services.projections.service import start_read_api

        await start_read_api(stack)
    if "router" in services:
        await stack.start_router()
    if children:
        from .supervisor import supervise

        stack.spawn("supervisor", supervise(children, stack.health))
    try:
        if "intake" in services:
            await stack.start_webhooks()
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
