"""Child services of ``needle up``: the router and the projections run as processes of their own
(``needle run router|projections``), so the HTTP intake keeps its core and a crash of one worker
takes nothing else down. The supervisor restarts a child that dies, with backoff, and reports each
child's liveness in /healthz. Children die with ``needle up`` even when it is SIGKILLed."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from .processes import spawn, stop

log = structlog.get_logger("needle.supervisor")
READY = "needle ready"


@dataclass
class Child:
    name: str
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    _offset: int = 0
    started_at: float = field(default=0.0)
    service: str = ""  # what it runs (``needle run SERVICE``): its name unless told (intake workers: intake-2 ...)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "services.entrypoints.cli", "run", self.service or self.name]

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        # SIGKILL if needle up dies abruptly: nats-server dies with it too, so a graceful stop could only
        # hang on a drain; nothing relies on a graceful exit (OCC and checkpoints make redelivery safe)
        self.proc = spawn(self.argv, log=self.log, death_signal=signal.SIGKILL, env=self.env)
        self.started_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        try:
            with open(self.log, "rb") as f:
                f.seek(self._offset)
                return READY.encode() in f.read()
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            if not self.alive:
                raise RuntimeError(f"{self.name} exited during start; see {self.log}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        stop(self.proc, signal.SIGTERM, timeout=20)


async def supervise(children: list[Child], health: dict[str, bool]) -> None:
    """Restart children that die (1 s, 2 s, ... up to 30 s between attempts); runs until cancelled."""
    backoff = {c.name: 1.0 for c in children}
    while True:
        for c in children:
            up = c.alive
            health[c.name] = up and c.ready()
            if not up:
                code = c.proc.returncode if c.proc is not None else None
                log.warning("child service died; restarting", service=c.name, exit_code=code,
                            retry_in=backoff[c.name])
                await asyncio.sleep(backoff[c.name])
                backoff[c.name] = min(backoff[c.name] * 2, 30.0)
                c.restarts += 1
                c.start()
            elif time.monotonic() - c.started_at > 60:
                backoff[c.name] = 1.0
        await asyncio.sleep(0.5)
