"""The residents' key-encryption key on a real stack: from a KMS hook (NEEDLE_KEK_COMMAND) instead of the
DIR/secrets file, and ``needle keys rewrap`` wrapping (and renaming) the keys an earlier needle stored
unwrapped under ``r.<resident id>``, run as a user runs it, against a running needle."""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.js.errors import KeyNotFoundError, NotFoundError

from shared.privacy import sealing
from shared.privacy.keystore import KEK_FILE, KV_STREAM, KekUnavailable, KeyStoreError, ResidentKey, ResidentKeys
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


async def test_keys_rewrap_wraps_and_renames_the_keys_of_an_earlier_needle(
        needle_factory: Callable[..., Any], tmp_path: Path) -> None:
    h: NeedleHandle = await needle_factory()
    nc, keys = h.stack.nc, h.stack.residents
    assert nc is not None and keys is not None and h.stack.kek is not None
    js = nc.jetstream()
    data_dir = str(h.stack.settings.data_dir)
    nats_env = {"NEEDLE_NATS_URL": h.stack.urls.nats}

    # a key this needle wrapped (so the KEK can be checked), and keys as earlier needles stored them:
    status, body = await report(h, {"name": "周九", "phone": unique_mobile()[0]})
    assert status == 201, body
    # unwrapped under r.<id> (before the KEK), wrapped under r.<id> (before the HMAC names), unwrapped under
    # h.<HMAC> (a needle without a KEK), one forgotten under r.<id> (its purge marker names the id)
    plain_id, moved_id, hmac_phone, gone_id = (f"res_{uuid.uuid4().hex[:24]}", f"res_{uuid.uuid4().hex[:24]}",
                                               unique_mobile()[0], f"res_{uuid.uuid4().hex[:24]}")
    plain = ResidentKey(plain_id, "0a1b2c3d4e5f6071", os.urandom(32), None)
    moved = ResidentKey(moved_id, "1b2c3d4e5f607182", os.urandom(32), None)
    gone = ResidentKey(gone_id, "2c3d4e5f60718293", os.urandom(32), None)
    old_revisions = [await keys.kv.create(f"r.{plain_id}", plain.encode()),
                     await keys.kv.create(f"r.{moved_id}", moved.encode(h.stack.kek))]
    await keys.kv.create(f"r.{gone_id}", gone.encode())
    await keys.destroy(await keys.lookup(gone_id))  # type: ignore[arg-type]
    bare = ResidentKeys(nc)  # no KEK: stores keys unwrapped
    await bare.start(watch=False)
    hmac_key = await bare.key_for_phone(sealing.normalize_phone(hmac_phone))
    old_revisions.append(hmac_key.revision)
    clear = [plain.key, hmac_key.key]
    # issues sealed with those keys
    issues = {}
    for rid, resident in ((plain_id, {"id": plain_id, "name": "吴十", "phone": unique_mobile()[0]}),
                          (moved_id, {"id": moved_id, "name": "郑一"}),
                          (hmac_key.resident_id, {"name": "王二", "phone": hmac_phone})):
        status, body = await report(h, resident)
        assert status == 201, body
        issues[rid] = (body["id"], resident["name"])
        assert (await get_issue(h, body["id"], GW1))["resident"]["name"] == resident["name"]
    await asyncio.sleep(0.3)
    assert all(sealing.b64(k).encode() in disk_bytes(tmp_path) for k in clear)  # the clear keys, before

    # refused without a KEK (a data dir with no KEK file and no NEEDLE_KEK_COMMAND: none is made), and with
    # a KEK that is not this needle's; nothing changed
    elsewhere = tmp_path / "elsewhere"
    rc, out, err = await needle_cli("keys", "rewrap", "--data-dir", str(elsewhere), **nats_env)
    assert rc == 2 and "refusing to rewrap: no key-encryption key" in err, (out, err)
    assert not (elsewhere / KEK_FILE).exists()
    rc, out, err = await needle_cli("keys", "rewrap", "--data-dir", str(elsewhere), **nats_env,
                                    NEEDLE_KEK_COMMAND=kek_helper(tmp_path, KEY_HEX))
    assert rc == 2 and "is not this needle's" in err, (out, err)
    assert (await keys.kv.get(f"r.{plain_id}")).revision == old_revisions[0]

    rc, out, err = await needle_cli("keys", "rewrap", "--data-dir", data_dir, **nats_env)
    assert rc == 0, (out, err)
    progress = [line.split(": ") for line in out.splitlines() if line.startswith("key ")]
    assert [p[0] for p in progress] == ["key 1 of 3", "key 2 of 3", "key 3 of 3"], out
    assert sorted(p[1] for p in progress) == ["moved", "wrapped", "wrapped"], out
    assert "3 resident key(s): 2 wrapped with the key-encryption key, 1 moved" in out, out
    assert "1 marker(s) naming an id erased" in out, out

    check = ResidentKeys(nc, kek=h.stack.kek)
    await check.start(watch=False)
    for key in (plain, moved, hmac_key):
        name = await check.entry_name(key.resident_id)
        entry = await check.kv.get(name)
        assert "wrapped" in orjson.loads(entry.value), name
        assert ResidentKey.decode(key.resident_id, entry.value, entry.revision, h.stack.kek).key == key.key
        with pytest.raises(KeyNotFoundError):
            await check.kv.get(f"r.{key.resident_id}")
    for seq in old_revisions:  # the old messages are erased from the stream, not only purged
        with pytest.raises(NotFoundError):
            await js.get_msg(KV_STREAM, seq=seq)
    info = await js.stream_info(KV_STREAM, subjects_filter=">")
    subjects = list((info.state.subjects or {}).keys())
    assert not any(".r." in s or "res_" in s for s in subjects), subjects  # no subject names an id any more
    await asyncio.sleep(0.5)
    disk = disk_bytes(tmp_path)
    assert not any(sealing.b64(k).encode() in disk for k in clear)  # the clear keys are gone from disk

    # the residents' data still unseals through the API (also from the bucket, not a cached key)
    keys._cache.clear()
    for rid, (issue_id, name) in issues.items():
        resident = (await get_issue(h, issue_id, GW1))["resident"]
        assert resident["id"] == rid and resident["name"] == name, resident

    # a second run changes nothing and says so
    rc, out, err = await needle_cli("keys", "rewrap", "--data-dir", data_dir, **nats_env)
    assert rc == 0 and "nothing to do" in out and "key 1 of" not in out, (out, err)
    info2 = await js.stream_info(KV_STREAM)
    assert info2.state.last_seq == info.state.last_seq



async def test_rewrap_stopped_halfway_loses_no_key_and_a_forget_meanwhile_takes_both_copies(
        needle_factory: Callable[..., Any]) -> None:
    """The states a rewrap stopped at any point leaves: a lookup finds the key in each, and a second run
    finishes the job; a forget meanwhile erases the copy under the other name too; two different keys for
    one resident are left alone."""
    h: NeedleHandle = await needle_factory()
    nc, keys, kek = h.stack.nc, h.stack.residents, h.stack.kek
    assert nc is not None and keys is not None and kek is not None
    js = nc.jetstream()
    ids = [f"res_{uuid.uuid4().hex[:24]}" for _ in range(4)]
    olds = [ResidentKey(rid, f"{n:016x}", os.urandom(32), None) for n, rid in enumerate(ids)]
    # 0: stopped after writing the new wrapped entry, before erasing r.<id>
    await keys.kv.create(f"r.{ids[0]}", olds[0].encode())
    await keys.kv.create(await keys.entry_name(ids[0]), olds[0].encode(kek))
    # 1: an unwrapped h.<HMAC> stopped after its wrapped copy under r.<id> was written, before erasing it
    h1 = await keys.kv.create(await keys.entry_name(ids[1]), olds[1].encode())
    await keys.kv.create(f"r.{ids[1]}", olds[1].encode(kek))
    # 2: both names, different keys (not a state rewrap makes): left alone
    await keys.kv.create(f"r.{ids[2]}", olds[2].encode())
    await keys.kv.create(await keys.entry_name(ids[2]), ResidentKey(ids[2], "f" * 16, os.urandom(32), None).encode(kek))
    # 3: forgotten while both copies exist: both go
    await keys.kv.create(f"r.{ids[3]}", olds[3].encode())
    await keys.kv.create(await keys.entry_name(ids[3]), olds[3].encode(kek))
    keys._cache.clear()
    for old in (olds[0], olds[1], olds[3]):
        assert (await keys.lookup(old.resident_id)).key == old.key  # type: ignore[union-attr]
    await keys.destroy(await keys.lookup(ids[3]))  # type: ignore[arg-type]
    for name in (f"r.{ids[3]}", await keys.entry_name(ids[3])):
        with pytest.raises(KeyNotFoundError):
            await keys.kv.get(name)

    seen: list[str] = []
    done = await keys.rewrap(lambda n, total, what: seen.append(what))
    assert done.checked and done.total == 3 and done.wrapped == 2 and done.moved == 0, done
    assert len(done.left) == 1 and "two different keys" in done.left[0], done
    assert sorted(seen) == ["left: two different keys for one resident; left as they are", "wrapped", "wrapped"]
    keys._cache.clear()
    for old in olds[:2]:
        entry = await keys.kv.get(await keys.entry_name(old.resident_id))
        assert "wrapped" in orjson.loads(entry.value)
        assert (await keys.lookup(old.resident_id)).key == old.key  # type: ignore[union-attr]
        with pytest.raises(KeyNotFoundError):
            await keys.kv.get(f"r.{old.resident_id}")
    with pytest.raises(NotFoundError):
        await js.get_msg(KV_STREAM, seq=h1)  # the unwrapped h.<HMAC> message: erased
    assert (await keys.kv.get(f"r.{ids[2]}")).value == olds[2].encode()  # left as it was
    again = await keys.rewrap()
    assert not again.changed and again.total == 1 and len(again.left) == 1
