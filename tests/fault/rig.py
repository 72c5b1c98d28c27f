"""The fault rig: a loopback 3-node JetStream cluster (R3 streams), a Postgres, and needle's three
services each in its own process (``needle run intake|router|projections``), pointed at the
cluster with a comma-separated NEEDLE_NATS_URL. Every fault is injected by the PIDs this rig
started, never by name."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.bench.procs import Child, needle_argv
from services.entrypoints.embedded import EmbeddedPostgres
from services.entrypoints.processes import free_port, spawn
from shared import auth
from shared.events import subjects as sj
from tests.fault.cluster import NatsCluster
from tests.support import ensure_database

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SERVICES = ("intake", "router", "projections")


@dataclass
class Rig:
    root: Path
    pg_admin_url: str | None = None  # an existing Postgres (quick smoke); None: the rig starts its own
    sync_always: bool = False
    cluster: NatsCluster = field(init=False)
    pg: EmbeddedPostgres | None = None
    database_url: str = ""
    port: int = 0
    children: dict[str, Child] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cluster = NatsCluster(self.root, size=3, sync_always=self.sync_always)
        self.data_dir = self.root / "needle"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.key = auth.load_or_create_key(self.data_dir)  # before the services start: one key for all

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, role: str, scope: str = "") -> str:
        return auth.issue_token(self.key, role=role, scope=scope)

    # -- start / stop --------------------------------------------------------------------------
    async def start(self) -> None:
        self.cluster.start()
        admin = self.pg_admin_url
        if admin is None:
            self.pg = EmbeddedPostgres(self.root / "pgdata")
            await asyncio.to_thread(self.pg.start)
            admin = self.pg.url
        self.database_url = await ensure_database(admin, f"needle_fault_{free_port()}")
        self.port = free_port()
        # all three at once, as compose starts them: each creates the streams and buckets on the fresh cluster
        # while it elects their leaders, and waits for JetStream to settle (shared/store/settling.py)
        for name in SERVICES:
            self.start_service(name)
        await asyncio.to_thread(self.children["router"].wait_line, "needle ready", 90)
        await asyncio.to_thread(self.children["intake"].wait_http, f"{self.base_url}/healthz", 90)
        await asyncio.to_thread(self.children["projections"].wait_line, "needle ready", 90)

    def env(self) -> dict[str, str]:
        return {
            "NEEDLE_NATS_URL": self.cluster.url, "NEEDLE_DATABASE_URL": self.database_url,
            "NEEDLE_DATA_DIR": str(self.data_dir), "NEEDLE_STREAM_REPLICAS": "3",
            "NEEDLE_ORG": str(FIXTURES / "contract_org.yaml"), "NEEDLE_RULES": str(FIXTURES / "contract_rules.yaml"),
            "NEEDLE_SYNC_ALWAYS": "1" if self.sync_always else "0", "NEEDLE_LOG_LEVEL": "warning",
        }

    def start_service(self, name: str) -> Child:
        log = self.root / "logs" / f"{name}.log"
        with contextlib.suppress(OSError):  # a restarted service's "needle ready" must be its own
            log.rename(log.with_suffix(f".{int(time.time() * 1000)}.log"))
        # SIGKILLed when the test process dies, however it dies: a rig never leaves a service behind
        proc = spawn(needle_argv("run", name, "--port", str(self.port)), log=log, death_signal=signal.SIGKILL,
                     env={**os.environ, **self.env()})
        child = Child(proc=proc, log=log, name=name)
        self.children[name] = child
        return child

    async def stop(self) -> None:
        for name in reversed(SERVICES):
            if name in self.children:
                await asyncio.to_thread(self.children[name].stop, 20)
        await asyncio.to_thread(self.cluster.stop)
        if self.pg is not None:
            await asyncio.to_thread(self.pg.stop)

    # -- faults ---------------------------------------------------------------------------------
    def events_leader(self) -> int:
        """Index of the node that leads NEEDLE_EVENTS (the interesting one to lose)."""
        name = self.cluster.stream_leader(sj.EVENTS_STREAM)
        return self.cluster.index_of(name) if name else 0

    async def kill_nats_node(self, down_s: float, *, leader: bool = True) -> str:
        """kill -9 the NEEDLE_EVENTS leader (an election follows) or a follower, restart it after ``down_s``."""
        i = self.events_leader()
        if not leader:
            i = (i + 1) % len(self.cluster.nodes)
        self.cluster.kill(i)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.cluster.start_node, i)
        await asyncio.to_thread(self.cluster.wait_ready, 90)
        role = "NEEDLE_EVENTS leader" if leader else "a follower"
        return f"kill -9 nats {self.cluster.nodes[i].name} ({role}), {down_s:.0f} s down, restart"

    async def pause_nats_node(self, paused_s: float) -> str:
        i = self.events_leader()
        self.cluster.pause(i)
        await asyncio.sleep(paused_s)
        self.cluster.resume(i)
        await asyncio.to_thread(self.cluster.wait_ready, 90)
        return f"SIGSTOP nats {self.cluster.nodes[i].name} (NEEDLE_EVENTS leader) {paused_s:.0f} s, SIGCONT"

    async def kill_service(self, name: str, down_s: float) -> str:
        child = self.children[name]
        child.proc.kill()  # SIGKILL by the PID we started
        await asyncio.to_thread(child.proc.wait, 10)
        await asyncio.sleep(down_s)
        fresh = self.start_service(name)
        if name == "intake":
            await asyncio.to_thread(fresh.wait_http, f"{self.base_url}/healthz", 90)
        else:
            await asyncio.to_thread(fresh.wait_line, "needle ready", 90)
        return f"kill -9 {name}, restart"

    async def restart_postgres(self, down_s: float) -> str:
        assert self.pg is not None, "the Postgres restart needs the rig's own Postgres"
        await asyncio.to_thread(self.pg.stop)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.pg.start)
        return f"restart postgres ({down_s:.0f} s down)"

    def tails(self) -> str:
        out = [f"--- {name} ---\n{c.tail(1500)}" for name, c in self.children.items()]
        for n in self.cluster.nodes:
            with contextlib.suppress(OSError):
                out.append(f"--- nats {n.name} ---\n{n.log.read_text(errors='replace')[-1000:]}")
        return "\n".join(out)
