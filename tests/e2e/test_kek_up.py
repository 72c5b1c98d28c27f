"""``needle up`` on a KMS hook (NEEDLE_KEK_COMMAND), as an operator runs it: every process (the intake here,
the router and projections children) runs the command once at its start and none writes the key to disk;
``needle keys rewrap`` finds the running needle through its data dir and gets the same key the same way."""
from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.entrypoints.processes import free_port
from shared import auth
from shared.privacy.keystore import KEK_FILE
from tests.e2e.test_ops_cli import NEEDLE, env

KEY_HEX = "3c" * 32


def test_needle_up_takes_its_kek_from_the_kms_command_in_every_process(tmp_path: Path) -> None:
    calls = tmp_path / "kms-calls.log"
    helper = tmp_path / "kms-helper.py"
    helper.write_text("import os, sys\n"
                      f"with open({str(calls)!r}, 'a') as f:\n"
                      "    f.write(f'{os.getpid()}\\n')\n"
                      f"print({KEY_HEX!r})\n")
    kms_env = {**env(), "NEEDLE_KEK_COMMAND": shlex.join([sys.executable, str(helper)])}
    data, port = tmp_path / "data", free_port()
    data.mkdir()
    out = open(tmp_path / "up.out", "wb")
    proc = subprocess.Popen([str(NEEDLE), "up", "--data-dir", str(data), "--port", str(port)], stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=kms_env)
    try:
        deadline = time.monotonic() + 90
        while b"needle ready" not in (tmp_path / "up.out").read_bytes():
            assert proc.poll() is None, (tmp_path / "up.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "needle up not ready"
            time.sleep(0.1)
        # once per process: this one (intake), the router child, the projections child
        assert len(calls.read_text().split()) == 3, calls.read_text()
        key = auth.load_or_create_key(data)
        gw = {"Authorization": f"Bearer {auth.issue_token(key, role='grid_worker', scope='area:wuxing-g1')}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as client:
            r = client.post("/v1/issues", headers=gw, json={"grid": "wuxing-g1", "category": "road_damage",
                                                            "title": "pothole", "resident": {"name": "冯三",
                                                                                             "phone": "13955556666"}})
            assert r.status_code == 201, r.text
            assert client.get(f"/v1/issues/{r.json()['id']}", headers=gw).json()["resident"]["name"] == "冯三"
        # the rewrap command attaches through the data dir and gets the KEK from the same command
        done = subprocess.run([str(NEEDLE), "keys", "rewrap", "--data-dir", str(data)], capture_output=True,
                              text=True, env=kms_env, timeout=120)
        assert done.returncode == 0 and "nothing to do" in done.stdout, (done.stdout, done.stderr)
        assert len(calls.read_text().split()) == 4
        assert not (data / KEK_FILE).exists()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        out.close()
    assert not (data / KEK_FILE).exists()
