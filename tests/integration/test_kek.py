"""The residents' key-encryption key on a real stack: from a KMS hook (NEEDLE_KEK_COMMAND) instead of the
DIR/secrets file, and ``needle keys rewrap`` wrapping (and renaming) the keys an earlier needle stored
unwrapped under ``r.<resident id>``, run as a user runs it, against a running needle."""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared.privacy.keystore import KEK_FILE, KekUnavailable, KeyStoreError, ResidentKey
from tests.integration.test_residents import GW1, disk_bytes, get_issue, report, unique_mobile
from tests.support import NeedleHandle

NEEDLE = Path(sys.executable).parent / "needle"
ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
KEY_HEX = "5e" * 16 + "a7" * 16
KEY = bytes.fromhex(KEY_HEX)


def kek_helper(tmp_path: Path, printed: str, name: str = "kms-helper.py", exit_status: int = 0) -> str:
    script = tmp_path / name
    script.write_text(f"import sys\nprint({printed!r})\nsys.exit({exit_status})\n")
    return shlex.join([sys.executable, str(script)])


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEEDLE_")}
    return {**env, "NEEDLE_ORG": str(FIXTURES / "contract_org.yaml"),
            "NEEDLE_RULES": str(FIXTURES / "contract_rules.yaml"), **extra}


async def needle_cli(*args: str, **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(str(NEEDLE), *args, env=cli_env(**env),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_kek_comes_from_the_kms_command_and_never_touches_the_disk(
        needle_factory: Callable[..., Any], tmp_path: Path) -> None:
    h: NeedleHandle = await needle_factory(kek_command=kek_helper(tmp_path, KEY_HEX))
    assert h.stack.kek == KEY and h.stack.nc is not None and h.stack.residents is not None
    typed, _ = unique_mobile()
    status, body = await report(h, {"name": "孙八", "phone": typed})
    assert status == 201, body
    shown = await get_issue(h, body["id"], GW1)
    assert shown["resident"]["name"] == "孙八"
    rid = shown["resident"]["id"]
    # the stored key is wrapped, and opens with the KMS's key (not without it, nor with another)
    entry = await h.stack.residents.kv.get(await h.stack.residents.entry_name(rid))
    stored = orjson.loads(entry.value)
    assert "wrapped" in stored and "key" not in stored
    key = ResidentKey.decode(rid, entry.value, entry.revision, KEY)
    assert key.key == (await h.stack.residents.lookup(rid)).key and len(key.key) == 32  # type: ignore[union-attr]
    with pytest.raises(KeyStoreError):
        ResidentKey.decode(rid, entry.value, entry.revision, bytes(32))
    # no key-encryption key file was made, and the KEK is on no disk
    data_dir = h.stack.settings.data_dir
    assert not (data_dir / KEK_FILE).exists()
    await asyncio.sleep(0.5)
    assert KEY not in disk_bytes(tmp_path) and KEY_HEX.encode() not in disk_bytes(data_dir)


async def test_a_kms_command_that_fails_refuses_to_start(needle_factory: Callable[..., Any], tmp_path: Path) -> None:
    leaked = "f00d" * 16  # 64 hex characters, printed by a command that then fails: never used, never shown
    with pytest.raises(KekUnavailable, match="exit status 4"):
        await needle_factory(kek_command=kek_helper(tmp_path, leaked, exit_status=4))
    # as an operator sees it: one line, before any server starts, without the command's output
    data = tmp_path / "refused"
    start = time.monotonic()
    for command, why in ((kek_helper(tmp_path, "not-a-key " + leaked, "bad.py"), "expected 64 hex characters"),
                         (kek_helper(tmp_path, leaked, "fails.py", exit_status=4), "exit status 4")):
        rc, out, err = await needle_cli("up", "--data-dir", str(data), "--port", "1",
                                        NEEDLE_KEK_COMMAND=command)
        assert rc == 2, (out, err)
        refusal = [line for line in err.splitlines() if line.startswith("needle:")]  # after warnings, if any
        assert len(refusal) == 1 and err.endswith(refusal[0] + "\n"), err
        assert refusal[0].startswith("needle: refusing to start: NEEDLE_KEK_COMMAND (") and why in refusal[0], err
        assert leaked not in err + out and "Traceback" not in err
    assert time.monotonic() - start < 60
    assert not (data / KEK_FILE).exists() and not list((data / "nats").iterdir())  # nothing was started

