"""NEEDLE_KEK_COMMAND: the residents' key-encryption key from a KMS hook (a command printing 64 hex
characters), run without a shell, with a timeout, never echoed, never written to disk; and the
DIR/secrets/resident-kek.key file when it is not set."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import pytest

from shared.privacy.keystore import KEK_FILE, KekUnavailable, load_or_create_kek, parse_kek, run_kek_command
from shared.settings import Settings

KEY_HEX = "0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0"
KEY = bytes.fromhex(KEY_HEX)
SECRETISH = "c0ffee" * 10  # what a broken helper might print: must never appear in an error


def helper(tmp_path: Path, body: str, name: str = "kek helper.py") -> str:
    """A command line running a small Python script (its path has a space: the line is shlex-quoted)."""
    script = tmp_path / name
    script.write_text("import sys, time\n" + body + "\n")
    return shlex.join([sys.executable, str(script)])


def refused(command: str, timeout_s: float = 30.0) -> str:
    with pytest.raises(KekUnavailable) as exc:
        run_kek_command(command, timeout_s)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("NEEDLE_KEK_COMMAND")
    return message


def test_parse_kek_takes_exactly_64_hex_characters_and_never_echoes_what_it_got() -> None:
    assert parse_kek(f"  {KEY_HEX}\n".encode(), "x") == KEY
    assert parse_kek(KEY_HEX.upper().encode(), "x") == KEY
    for bad in (b"", KEY_HEX[:-2].encode(), (KEY_HEX + "00").encode(), (KEY_HEX[:-1] + "g").encode(),
                (KEY_HEX[:32] + " " + KEY_HEX[33:]).encode(), b"\xff" * 64, b"D7Mt" * 11,
                SECRETISH.encode()[:64]):
        with pytest.raises(KekUnavailable) as exc:
            parse_kek(bad, "the helper")
        assert "expected 64 hex characters" in str(exc.value)
        assert bad.decode(errors="replace").strip() not in str(exc.value) or not bad.strip()


def test_the_command_runs_without_a_shell_and_its_stdout_is_the_key(tmp_path: Path) -> None:
    # arguments are passed as they are (no shell: `$HOME` and `;` stay literal); stdin is empty
    cmd = helper(tmp_path, "assert sys.argv[1:] == ['a b', '$HOME;', 'x'], sys.argv\n"
                           "assert sys.stdin.read() == ''\n"
                           f"print('{KEY_HEX}')")
    assert run_kek_command(cmd + " 'a b' '$HOME;' x") == KEY


def test_a_failing_command_is_refused_without_its_output(tmp_path: Path) -> None:
    message = refused(helper(tmp_path, f"print('{SECRETISH}'); sys.exit(3)"))
    assert "exit status 3" in message and SECRETISH not in message and f"({Path(sys.executable).name})" in message
    message = refused(helper(tmp_path, f"print('{SECRETISH}')"))
    assert "expected 64 hex characters" in message and SECRETISH not in message
    message = refused(helper(tmp_path, f"sys.stdout.write('{KEY_HEX[:-1]}')"))
    assert "got 63 characters" in message
    assert "could not be run" in refused(str(tmp_path / "no-such-helper"))
    assert "not a valid command line" in refused("vault read 'unbalanced")
    assert "empty" in refused("   ")


def test_a_command_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    message = refused(helper(tmp_path, f"print('{KEY_HEX}', flush=True); time.sleep(60)"), timeout_s=0.5)
    assert "within 0.5 s" in message and KEY_HEX not in message
    assert time.monotonic() - start < 10


def test_the_setting_chooses_the_command_over_the_file_and_writes_nothing(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path, kek_command="  ").kek_command is None  # blank: unset (the file)
    settings = Settings(data_dir=tmp_path, kek_command=helper(tmp_path, f"print('{KEY_HEX}')"))
    assert load_or_create_kek(settings) == KEY
    assert not (tmp_path / KEK_FILE).exists()  # never written to disk
    assert not (tmp_path / "secrets").exists()
    # a file left from before must hold the same key: else the keys it wrapped would no longer open
    (tmp_path / "secrets").mkdir(mode=0o700)
    (tmp_path / KEK_FILE).write_text(KEY_HEX + "\n")
    assert load_or_create_kek(settings) == KEY
    (tmp_path / KEK_FILE).write_text("ab" * 32)
    with pytest.raises(KekUnavailable, match="another key-encryption key"):
        load_or_create_kek(settings)
    failing = Settings(data_dir=tmp_path, kek_command=helper(tmp_path, "sys.exit(1)", "fails.py"))
    with pytest.raises(KekUnavailable, match="exit status 1"):
        load_or_create_kek(failing)  # never falls back to the file


def test_without_the_setting_the_file_is_made_once_unless_it_must_exist(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(KekUnavailable, match="does not exist"):
        load_or_create_kek(settings, create=False)
    assert not (tmp_path / KEK_FILE).exists()
    kek = load_or_create_kek(settings)
    assert len(kek) == 32 and load_or_create_kek(settings, create=False) == kek
    assert (tmp_path / KEK_FILE).stat().st_mode & 0o777 == 0o600
    (tmp_path / KEK_FILE).write_text("not a key")
    with pytest.raises(KekUnavailable, match="got 9 characters"):
        load_or_create_kek(settings)
