"""``needle up`` as a user runs it (DESIGN.md, "Contract: CLI"): a real process tree with the
embedded nats-server and Postgres in a data directory. Stops (SIGTERM, SIGKILL), restarts on
the same data, refuses bad rulebooks, and ``needle token issue``'s refusals."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.entrypoints.embedded import _running
from services.entrypoints.processes import free_port
from shared import auth

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
ORG = FIXTURES / "contract_org.yaml"
RULES = FIXTURES / "contract_rules.yaml"
NEEDLE = Path(sys.executable).parent / "needle"


def clean_env() -> dict[str, str]:
    """The test's environment without NEEDLE_* (which would point needle at other servers)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("NEEDLE_")}


def procs_mentioning(data_dir: Path) -> list[tuple[int, str]]:
    """Live processes whose command line mentions ``data_dir`` (zombies have an empty one)."""
    out = []
    needle_ = str(data_dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        cmd = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        if needle_ in cmd:
            out.append((int(entry.name), cmd))
    return out


def poll(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


class Up:
    """One ``needle up`` process; its output is drained by a thread (a full pipe would stall it)."""

    def __init__(self, data_dir: Path, port: int, org: Path = ORG, rules: Path = RULES,
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.data_dir, self.port = data_dir, port
        files = ["--org", str(org), "--rules", str(rules)] if str(org) != "." else []  # Path(""): the defaults
        self.proc = subprocess.Popen(
            [str(NEEDLE), "up", "--data-dir", str(data_dir), "--port", str(port), *files, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=clean_env() | (env or {}),
            cwd=ROOT)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if "needle ready" in line:
                self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 60.0) -> httpx.Client:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise AssertionError(f"needle up exited with {self.proc.returncode}:\n{self.output[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"needle up not ready within {timeout} s:\n{self.output[-3000:]}")
        assert f"needle ready http://127.0.0.1:{self.port}" in self.output
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> tuple[int | None, float]:
        """Signal the ``needle up`` process alone (not its group); its exit code and how long it took."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - t0


def postmaster_alive(data_dir: Path) -> bool:
    """Whether the postgres of ``data_dir``'s lock file still runs (it may outlive a SIGKILLed needle up by a
    moment: it stops on its own death signal; its processes retitle themselves, so the cmdline is no guide)."""
    try:
        pid = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return _running(pid)


def _cleanup(ups: list[Up]) -> None:
    """Never leave a process behind, whatever the test did (only ours: by pid)."""
    for up in ups:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait(10)
        for pid, _ in procs_mentioning(up.data_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        poll(lambda up=up: not procs_mentioning(up.data_dir), 5)
        poll(lambda up=up: not postmaster_alive(up.data_dir), 20)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the module: only the first start pays for initdb (~2.5 s); every later
    test is a restart on data an earlier `needle up` left (whichever the order)."""
    return tmp_path_factory.mktemp("needle-up") / "data"


@pytest.fixture
def launch(data_dir: Path) -> Iterator[Callable[..., Up]]:
    ups: list[Up] = []

    def start(port: int | None = None, **kw: Any) -> Up:
        assert not procs_mentioning(data_dir), "an earlier needle up still runs on the data dir"
        up = Up(data_dir, port or free_port(), **kw)
        ups.append(up)
        return up

    yield start
    _cleanup(ups)


def token(data_dir: Path, role: str, scope: str = "") -> str:
    """A token from ``needle token issue`` (the contract way)."""
    r = subprocess.run([str(NEEDLE), "token", "issue", "--data-dir", str(data_dir), "--role", role, "--scope", scope],
                       capture_output=True, text=True, env=clean_env(), timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


# -- stopping -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sigtermed(data_dir: Path) -> dict[str, Any]:
    """One ``needle up`` that answered a request, then got SIGTERM: what it left behind."""
    data = data_dir
    up = Up(data, free_port())
    try:
        with up.wait_ready() as client:
            servers = procs_mentioning(data)
            admin = auth.issue_token(auth.load_or_create_key(data), role="admin", scope="")
            r = client.get("/healthz", headers=bearer(admin))
            assert r.status_code == 200, r.text
        rc, took = up.stop(signal.SIGTERM, 20)
        at_exit = procs_mentioning(data) if rc is not None else []
        gone = poll(lambda: not procs_mentioning(data), 10)
        outcome = {"rc": rc, "took": took, "servers": servers, "at_exit": at_exit, "gone": gone,
                   "left": procs_mentioning(data), "runtime_json": (data / "runtime.json").exists(),
                   "output": up.output}
    finally:
        _cleanup([up])  # before the other tests restart on the same data dir
    return outcome


def test_sigterm_exits_within_20s_and_leaves_no_servers(sigtermed: dict[str, Any]) -> None:
    kinds = " ".join(cmd for _, cmd in sigtermed["servers"])
    assert "nats-server" in kinds and "postgres" in kinds, sigtermed["servers"]  # the scan does see them
    assert sigtermed["rc"] is not None, f"still running 20 s after SIGTERM:\n{sigtermed['output'][-2000:]}"
    assert sigtermed["took"] < 20
    assert sigtermed["gone"], sigtermed["left"]


def test_sigterm_stops_everything_cleanly(sigtermed: dict[str, Any]) -> None:
    assert sigtermed["rc"] == 0, sigtermed["rc"]
    assert not sigtermed["runtime_json"], "runtime.json left behind"
    assert sigtermed["at_exit"] == [], "servers still running when needle up had exited"


def test_sigkill_of_needle_up_takes_its_servers_down(launch: Callable[..., Up]) -> None:
    up = launch()
    up.wait_ready().close()
    children = procs_mentioning(up.data_dir)
    kinds = " ".join(cmd for _, cmd in children)
    assert "nats-server" in kinds and "postgres" in kinds, children
    os.kill(up.proc.pid, signal.SIGKILL)  # the process itself, not its group
    up.proc.wait(10)
    assert poll(lambda: not procs_mentioning(up.data_dir), 15), procs_mentioning(up.data_dir)


# -- restart --------------------------------------------------------------------------------------------------------
def test_restart_on_the_same_data_dir_keeps_every_issue(launch: Callable[..., Up], data_dir: Path) -> None:
    data, port = data_dir, free_port()
    up = launch(port)
    client = up.wait_ready()
    gw = bearer(token(data, "grid_worker", "area:wuxing-g1"))
    key_ = auth.load_or_create_key(data)
    gw2 = bearer(auth.issue_token(key_, role="grid_worker", scope="area:wuxing-g2"))
    admin = bearer(auth.issue_token(key_, role="admin", scope=""))
    key = f"form-{uuid.uuid4()}"
    bodies = [({"grid": "wuxing-g1", "category": "road_damage", "title": f"路面破损 {i}",
                "location": {"lat": 30.002, "lon": 122.1028}}, gw) for i in range(3)]
    phone = "139" + str(uuid.uuid4().int)[:8]
    bodies[0][0]["resident"] = {"name": "陈大爷", "phone": phone}  # its key must survive the restart too
    bodies += [({"grid": "wuxing-g2", "category": "neighbour_dispute", "title": f"邻里纠纷 {i}"}, gw2)
               for i in range(2)]
    ids = []
    for n, (body, who) in enumerate(bodies):
        r = client.post("/v1/issues", json=body, headers=who | ({"Idempotency-Key": key} if n == 0 else {}))
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    before = {}
    for issue_id in ids:  # wait for the router, so nothing is in flight at the stop
        assert poll(lambda i=issue_id: bool(client.get(f"/v1/issues/{i}", headers=admin).json()["tasks"]), 10)
        before[issue_id] = client.get(f"/v1/issues/{issue_id}", headers=admin).json()
    events_before = {i: client.get(f"/v1/issues/{i}/events", headers=admin).json() for i in ids}
    # `needle token revoke` finds the running needle through the data dir; the token is refused at once
    revoked = bearer(auth.issue_token(key_, role="grid_worker", scope="area:wuxing-g1", subject="leaver"))
    assert client.get(f"/v1/issues/{ids[0]}", headers=revoked).status_code == 200
    r = subprocess.run([str(NEEDLE), "token", "revoke", "--subject", "leaver", "--data-dir", str(data)],
                       capture_output=True, text=True, env=clean_env(), timeout=30)
    assert r.returncode == 0 and "revoked" in r.stdout, r.stderr
    assert poll(lambda: client.get(f"/v1/issues/{ids[0]}", headers=revoked).status_code == 401, 5)
    client.close()

    rc, took = up.stop(signal.SIGTERM, 20)
    assert rc is not None and took < 20
    assert poll(lambda: not procs_mentioning(data), 10), procs_mentioning(data)

    again = launch(port)
    client = again.wait_ready()
    for issue_id in ids:
        r = client.get(f"/v1/issues/{issue_id}", headers=gw if before[issue_id]["grid"] == "wuxing-g1" else gw2)
        assert r.status_code == 200, r.text  # the old tokens still work: the key lives in the data dir
        assert r.json() == before[issue_id]
        assert client.get(f"/v1/issues/{issue_id}/events", headers=admin).json() == events_before[issue_id]
    r = client.get(f"/v1/issues/{ids[0]}", headers=revoked)  # still revoked after the restart, from the first request
    assert r.status_code == 401 and r.json()["detail"] == "token revoked", r.text

    assert before[ids[0]]["resident"]["phone"] == f"+86{phone}"
    replay = client.post("/v1/issues", json=bodies[0][0], headers=gw | {"Idempotency-Key": key})
    assert replay.status_code in (200, 201) and replay.json()["id"] == ids[0], replay.text

    # `needle forget` finds the running needle through DIR/runtime.json
    r = subprocess.run([str(NEEDLE), "forget", phone, "--data-dir", str(data)], capture_output=True, text=True,
                       env=clean_env(), timeout=60)
    assert r.returncode == 0 and "forgotten" in r.stdout, (r.stdout, r.stderr)
    assert poll(lambda: client.get(f"/v1/issues/{ids[0]}", headers=gw).json()["resident"]["name"] == "[erased]", 10)
    fresh = client.post("/v1/issues", json={"grid": "wuxing-g1", "category": "road_damage", "title": "after restart"},
                        headers=gw)
    assert fresh.status_code == 201, fresh.text
    assert fresh.json()["id"] not in ids
    listed = client.get("/v1/issues", params={"area": "wuxing", "limit": 50},
                        headers=admin | {"Needle-Min-Seq": fresh.headers["Needle-Seq"]})
    assert listed.status_code == 200, listed.text
    assert {*ids, fresh.json()["id"]} <= {i["id"] for i in listed.json()["items"]}
    client.close()


# -- refusing to start, refusing bad tokens -------------------------------------------------------------------------
BAD_RULES = {
    "unknown-department-kind": ("lead: transport,", "lead: transprot,"),
    "bad-duration": ("resolve: PT24H", "resolve: 24 hours"),
    "bad-yaml": ("    start: community", "    start: [community"),
}


@pytest.mark.parametrize("case", list(BAD_RULES))
def test_bad_rulebook_makes_needle_up_exit_quickly_naming_file_and_line(tmp_path: Path, case: str) -> None:
    old, new = BAD_RULES[case]
    text = RULES.read_text()
    assert old in text
    bad = tmp_path / "bad-rules.yaml"
    bad.write_text(text.replace(old, new, 1))
    line = next(n for n, t in enumerate(bad.read_text().splitlines(), 1) if new in t)
    data = tmp_path / "data"

    t0 = time.monotonic()
    r = subprocess.run([str(NEEDLE), "up", "--data-dir", str(data), "--port", str(free_port()), "--org", str(ORG),
                        "--rules", str(bad)], capture_output=True, text=True, env=clean_env(), timeout=60)
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert took < 15, took
    assert "needle ready" not in out
    assert "Traceback" not in out, out
    where = re.search(re.escape(str(bad)) + r":(\d+)", out)
    assert where, out
    if case != "bad-yaml":  # YAML errors are reported where the parser noticed them
        assert int(where.group(1)) == line, out
    assert procs_mentioning(data) == []


@pytest.mark.parametrize(("args", "says"), [
    (["--role", "mayor", "--scope", "area:wuxing"], ["mayor", "grid_worker"]),
    (["--role", "handler", "--scope", "area:wuxing"], ["handler", "dept:"]),
    (["--role", "admin", "--ttl", "forever"], ["forever"]),
    # checked against the org (no needle runs here: the default org, the demo's, is named in the message)
    (["--role", "supervisor", "--scope", "area:atlantis"], ["no area 'atlantis'", "zhoushan.yaml"]),
    (["--role", "handler", "--scope", "dept:zhanmao-centre"], ["did you mean zhanmao-center"]),
    (["--role", "grid_worker", "--scope", "area:zhanmao"], ["is a street", "did you mean"]),
], ids=["unknown-role", "scope-of-another-kind", "bad-ttl", "no-such-area", "dept-typo", "grid-worker-not-on-a-grid"])
def test_token_issue_refuses_bad_input_with_a_clear_message(tmp_path: Path, args: list[str], says: list[str]) -> None:
    r = subprocess.run([str(NEEDLE), "token", "issue", "--data-dir", str(tmp_path), *args], capture_output=True,
                       text=True, env=clean_env(), timeout=30)
    assert r.returncode != 0
    assert r.stdout.strip() == ""  # no token printed
    assert "Traceback" not in r.stderr, r.stderr
    for word in says:
        assert word in r.stderr, r.stderr


def test_token_issue_prints_a_token_the_data_dir_key_accepts(tmp_path: Path) -> None:
    t = token(tmp_path, "supervisor", "area:dinghai")
    p = auth.TokenVerifier(auth.load_or_create_key(tmp_path)).verify(t)
    assert (p.role, p.scope) == ("supervisor", "area:dinghai")


def _children_of(pid: int) -> dict[int, str]:
    out: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), 0)
        if ppid == pid and cmd:
            out[int(entry.name)] = cmd
    return out


def _alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]


def test_sigkill_of_needle_up_takes_its_worker_processes_too(launch: Callable[..., Up]) -> None:
    """The router and projections run as child processes of `needle up`; they die with it, even though
    the nats-server they were connected to dies at the same moment."""
    up = launch()
    up.wait_ready().close()
    workers = {pid: cmd for pid, cmd in _children_of(up.proc.pid).items() if "services.entrypoints.cli run" in cmd}
    assert {"router", "projections"} <= {cmd.rsplit(" ", 1)[1] for cmd in workers.values()}, workers
    os.kill(up.proc.pid, signal.SIGKILL)
    up.proc.wait(10)
    assert poll(lambda: not any(_alive(pid) for pid in workers), 15), workers


def _reported_201s(metrics_text: str) -> float:
    m = re.search(r'^needle_http_requests_total\{method="POST",route="/v1/issues",status="201"\} (\S+)$',
                  metrics_text, re.M)
    return float(m.group(1)) if m else 0.0


def test_workers_share_the_port_and_the_metrics_and_stop_together(launch: Callable[..., Up]) -> None:
    """``needle up --workers 2``: a second intake process binds the same port (SO_REUSEPORT), both answer
    reports, /metrics sums both whichever answers the scrape, and SIGTERM takes both down."""
    up = launch(extra=("--workers", "2"))
    up.wait_ready().close()
    intakes = {pid: cmd for pid, cmd in _children_of(up.proc.pid).items()
               if cmd.endswith("services.entrypoints.cli run intake")}
    assert len(intakes) == 1, _children_of(up.proc.pid)
    gw = token(up.data_dir, "grid_worker", "area:wuxing-g1")
    body = {"grid": "wuxing-g1", "category": "road_damage", "title": "workers"}
    for _ in range(40):  # a connection each: the kernel spreads new connections over the two sockets
        with httpx.Client(base_url=f"http://127.0.0.1:{up.port}", timeout=10) as c:
            r = c.post("/v1/issues", json=body, headers=bearer(gw))
            assert r.status_code == 201, r.text
    files = {p.name for p in (up.data_dir / "metrics").iterdir()}
    pids = {int(m.group(1)) for name in files if (m := re.search(r"_(\d+)\.db$", name))}
    assert {up.proc.pid, *intakes} == pids, (files, intakes)  # both counted requests
    for _ in range(6):  # whichever process answers the scrape, it sums both
        with httpx.Client(base_url=f"http://127.0.0.1:{up.port}", timeout=10) as c:
            assert _reported_201s(c.get("/metrics").text) == 40
    rc, _ = up.stop(signal.SIGTERM, 30)
    assert rc == 0, up.output[-2000:]
    assert poll(lambda: not any(_alive(pid) for pid in intakes), 10), intakes


# -- one needle per data dir -------------------------------------------------------------------------------------
def nats_servers_on(data_dir: Path) -> list[int]:
    return [pid for pid, cmd in procs_mentioning(data_dir) if "nats-server" in cmd]


def test_one_needle_per_data_dir_a_second_up_refuses_and_backup_attaches(launch: Callable[..., Up],
                                                                         tmp_path: Path) -> None:
    from services.entrypoints.datadir import is_held

    up = launch()
    client = up.wait_ready()
    runtime = (up.data_dir / "runtime.json").read_text()
    assert nats_servers_on(up.data_dir) and len(nats_servers_on(up.data_dir)) == 1

    # a second `needle up` on the same data dir refuses at once, naming the running one, and touches nothing
    seen: list[int] = []
    watching = threading.Event()

    def watch() -> None:  # how many nats-servers run on the data dir while the other command runs
        while not watching.is_set():
            seen.append(len(nats_servers_on(up.data_dir)))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    second = subprocess.run([str(NEEDLE), "up", "--data-dir", str(up.data_dir), "--port", str(free_port()),
                             "--org", str(ORG), "--rules", str(RULES)], capture_output=True, text=True,
                            env=clean_env(), timeout=60, cwd=ROOT)
    took = time.monotonic() - t0
    assert second.returncode != 0 and "needle ready" not in second.stdout, second.stdout
    assert "already running" in second.stderr and f"pid {up.proc.pid}" in second.stderr, second.stderr
    assert f"http://127.0.0.1:{up.port}" in second.stderr, second.stderr
    assert took < 10, took
    assert (up.data_dir / "runtime.json").read_text() == runtime  # the running one's file is untouched

    # `needle backup` of a running needle attaches to it: no server of its own on the store
    backup = subprocess.run([str(NEEDLE), "backup", str(tmp_path / "bk"), "--data-dir", str(up.data_dir)],
                            capture_output=True, text=True, env=clean_env(), timeout=120, cwd=ROOT)
    watching.set()
    watcher.join(5)
    assert backup.returncode == 0, backup.stderr
    assert "NEEDLE_EVENTS" in backup.stdout and (tmp_path / "bk").exists()
    assert seen and max(seen) == 1, seen  # never a second nats-server on the data dir
    assert client.get("/healthz").status_code == 200  # the first needle never noticed
    client.close()

    # a SIGKILLed needle releases the data dir at once (the kernel drops its lock), and the next start works
    os.kill(up.proc.pid, signal.SIGKILL)
    up.proc.wait(10)
    assert not is_held(up.data_dir)
    assert poll(lambda: not procs_mentioning(up.data_dir), 15), procs_mentioning(up.data_dir)
    again = launch()
    with again.wait_ready() as c:
        assert c.get("/healthz").status_code == 200
    assert f'"pid": {again.proc.pid}' in (up.data_dir / "runtime.json").read_text()


def test_commands_that_attach_say_so_when_nobody_runs(tmp_path: Path) -> None:
    """A runtime.json left behind by a needle that died is not believed: nobody holds the data dir."""
    (tmp_path / "runtime.json").write_text('{"pid": 1, "nats_url": "nats://127.0.0.1:1"}')
    r = subprocess.run([str(NEEDLE), "rebuild", "--data-dir", str(tmp_path)], capture_output=True, text=True,
                       env=clean_env(), timeout=30, cwd=ROOT)
    assert r.returncode == 2 and "no running needle" in r.stderr, r.stderr


def test_up_says_where_to_go_next_and_demo_signs_the_dashboard_in(tmp_path: Path) -> None:
    up = Up(tmp_path / "data", free_port(), extra=("--demo",), org=Path(""), rules=Path(""))
    try:
        up.wait_ready().close()
        assert poll(lambda: "needle demo --url" in up.output, 5), up.output
        link = re.search(r"dashboard +(http://\S+/dashboard)#token=(\S+)", up.output)
        assert link, up.output
        p = auth.TokenVerifier(auth.load_or_create_key(up.data_dir)).verify(link.group(2))
        assert (p.role, p.scope) == ("supervisor", "area:zhoushan")
        assert f"--data-dir {up.data_dir}" in up.output and "/docs" in up.output
    finally:
        _cleanup([up])
