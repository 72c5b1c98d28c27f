"""A loopback JetStream cluster from the bundled nats-server: N nodes on 127.0.0.1, each with
its own store directory, routes to the others, and the same users as the embedded server
(``needle`` and the read-only ``integrator``, see nats_users.py).

A test and fault harness, not a deployment (``deploy/compose.yaml`` is one): it starts, stops,
kills (-9), restarts, pauses (SIGSTOP) and resumes (SIGCONT) single nodes, and waits until the
JetStream meta leader is elected and every running node reports its streams current.

Layout::

    DIR/nats-cluster/nN/nats.conf, nN/jetstream/
    DIR/logs/nats-nN.log
    DIR/secrets/nats.json            (the same passwords file as EmbeddedNats)
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.entrypoints.embedded import nats_config, nats_server_binary
from services.entrypoints.nats_users import authorization_block, load_or_create_passwords, url_for
from services.entrypoints.processes import free_port, spawn, stop, wait_port
from shared.files import private_dir, write_private

CLUSTER_NAME = "needle"


def cluster_block(name: str, port: int, routes: list[int], host: str = "127.0.0.1") -> str:
    route_urls = ", ".join(f'"nats-route://{host}:{p}"' for p in routes)
    return "\n".join([
        "cluster {",
        f"  name: {name}",
        f"  listen: {host}:{port}",
        f"  routes: [{route_urls}]",
        "}",
    ])


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    monitor_port: int
    root: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, path: str, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
        """GET the node's monitoring endpoint: (HTTP status, JSON body); (0, {}) when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"{}")
            except ValueError:
                return exc.code, {}
        except (OSError, ValueError):
            return 0, {}


@dataclass
class NatsCluster:
    data_dir: Path
    size: int = 3
    sync_always: bool = False
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("a cluster has at least one node")
        for i in range(1, self.size + 1):
            root = self.data_dir / "nats-cluster" / f"n{i}"
            self.nodes.append(Node(name=f"n{i}", port=free_port(), cluster_port=free_port(), monitor_port=free_port(),
                                   root=root, log=self.data_dir / "logs" / f"nats-n{i}.log"))

    # -- addresses -----------------------------------------------------------------------------
    def _passwords(self) -> dict[str, str]:
        return load_or_create_passwords(self.data_dir)

    @property
    def url(self) -> str:
        """The services' URL: every node, comma-separated (``NEEDLE_NATS_URL``)."""
        pw = self._passwords()["needle"]
        return ",".join(url_for("needle", pw, n.port) for n in self.nodes)

    @property
    def integrator_url(self) -> str:
        pw = self._passwords()["integrator"]
        return ",".join(url_for("integrator", pw, n.port) for n in self.nodes)

    def node_url(self, i: int) -> str:
        return url_for("needle", self._passwords()["needle"], self.nodes[i].port)

    # -- life cycle ----------------------------------------------------------------------------
    def _write_config(self, node: Node) -> Path:
        private_dir(node.root)
        routes = [n.cluster_port for n in self.nodes if n is not node]
        conf = node.root / "nats.conf"
        write_private(conf, nats_config(port=node.port, store_dir=node.root / "jetstream", sync_always=self.sync_always,
                                    monitor_port=node.monitor_port, server_name=node.name,
                                    cluster=cluster_block(CLUSTER_NAME, node.cluster_port, routes),
                                    authorization=authorization_block(self._passwords())))  # 0600 from the start
        return conf

    def start_node(self, i: int, timeout: float = 30.0) -> None:
        node = self.nodes[i]
        if node.running:
            return
        conf = self._write_config(node)
        # SIGKILL when we die: a harness must never leave a node behind
        node.proc = spawn([nats_server_binary(), "-c", str(conf)], log=node.log, death_signal=signal.SIGKILL)
        node.paused = False
        wait_port("127.0.0.1", node.port, node.proc, timeout, f"nats-server {node.name}", node.log)

    def start(self, timeout: float = 60.0) -> None:
        for i in range(self.size):
            self.start_node(i)
        self.wait_ready(timeout)

    def stop_node(self, i: int) -> None:
        node = self.nodes[i]
        if node.paused:
            self.resume(i)
        stop(node.proc, signal.SIGTERM)
        node.proc = None  # down on purpose (wait_ready complains only about nodes that died by themselves)

    def kill(self, i: int) -> None:
        """kill -9: no goodbye to the cluster, nothing flushed beyond what the OS already has."""
        node = self.nodes[i]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(10)
        node.proc = None
        node.paused = False

    def restart(self, i: int, timeout: float = 60.0) -> None:
        self.kill(i) if self.nodes[i].paused else self.stop_node(i)
        self.start_node(i)
        self.wait_ready(timeout)

    def pause(self, i: int) -> None:
        """SIGSTOP: the process keeps its sockets open but answers nothing (a hung machine)."""
        node = self.nodes[i]
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
        node.paused = True

    def resume(self, i: int) -> None:
        node = self.nodes[i]
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)
        node.paused = False

    def stop(self) -> None:
        for i in range(self.size):
            self.stop_node(i)

    # -- health --------------------------------------------------------------------------------
    def meta_leader(self) -> str | None:
        """The JetStream meta leader as seen by the first running node that answers."""
        for node in self.nodes:
            if not node.running or node.paused:
                continue
            status, body = node.monitor("/jsz")
            meta = body.get("meta_cluster") if status == 200 else None
            if isinstance(meta, dict) and meta.get("leader"):
                return str(meta["leader"])
        return None

    def stream_leader(self, stream: str) -> str | None:
        """The node that leads ``stream`` now (None while it is being elected or before it exists)."""
        for node in self.nodes:
            if not node.running or node.paused:
                continue
            status, body = node.monitor("/jsz?streams=true&raft=true")
            if status != 200:
                continue
            for acc in body.get("account_details") or []:
                for s in acc.get("stream_detail", []) or []:
                    if s.get("name") == stream:
                        leader = (s.get("cluster") or {}).get("leader")
                        if leader:
                            return str(leader)
        return None

    def index_of(self, name: str) -> int:
        return next(i for i, n in enumerate(self.nodes) if n.name == name)

    def healthy(self) -> bool:
        """A meta leader exists and every running, unpaused node says /healthz ok (its JetStream
        assets are current: a restarted node has caught up with its streams)."""
        live = [n for n in self.nodes if n.running and not n.paused]
        if not live or self.meta_leader() is None:
            return False
        return all(n.monitor("/healthz")[0] == 200 for n in live)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in self.nodes:
                if n.proc is not None and n.proc.poll() is not None and not n.paused:
                    raise RuntimeError(f"nats-server {n.name} exited with code {n.proc.returncode}; see {n.log}")
            if self.healthy():
                return
            time.sleep(0.1)
        states = {n.name: n.monitor("/healthz") for n in self.nodes if n.running}
        raise RuntimeError(f"cluster not ready within {timeout:.0f} s: meta leader {self.meta_leader()}, "
                           f"healthz {states}")
