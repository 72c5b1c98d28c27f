"""Webhook signatures (Needle-Signature, Stripe style): pure signing and verification."""
from __future__ import annotations

import hashlib
import hmac
import random

import pytest

from services.integrations import signing
from services.integrations.delivery import DeliveryConfig, backoff, render
from services.integrations.signing import SignatureError

SECRET = "whsec_0123456789abcdef"
BODY = b'{"specversion":"1.0","id":"abc.1","type":"needle.issue.reported.v1"}'
NOW = 1_750_000_000


def test_sign_is_hmac_sha256_of_timestamp_dot_body() -> None:
    header = signing.sign(SECRET, BODY, NOW)
    want = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert header == f"t={NOW},v1={want}"
    assert signing.verify(SECRET, BODY, header, now=NOW + 10) == NOW


def test_tampered_body_wrong_secret_and_tampered_timestamp_fail() -> None:
    header = signing.sign(SECRET, BODY, NOW)
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify(SECRET, BODY.replace(b"abc.1", b"abc.2"), header, now=NOW)
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify("another-secret-of-16+", BODY, header, now=NOW)
    moved = header.replace(f"t={NOW}", f"t={NOW + 1}")  # the timestamp is covered by the MAC
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify(SECRET, BODY, moved, now=NOW)


def test_old_or_future_timestamp_is_refused_outside_the_tolerance() -> None:
    header = signing.sign(SECRET, BODY, NOW)
    assert signing.verify(SECRET, BODY, header, now=NOW + 299) == NOW
    with pytest.raises(SignatureError, match="tolerance"):
        signing.verify(SECRET, BODY, header, now=NOW + 301)
    with pytest.raises(SignatureError, match="tolerance"):
        signing.verify(SECRET, BODY, header, now=NOW - 301)
    assert signing.verify(SECRET, BODY, header, now=NOW + 3000, tolerance_s=3600) == NOW


@pytest.mark.parametrize("header", [None, "", "garbage", "t=abc,v1=00", "v1=00", f"t={NOW}", f"t={NOW},v0=00"])
def test_malformed_headers_are_refused(header: str | None) -> None:
    with pytest.raises(SignatureError):
        signing.verify(SECRET, BODY, header, now=NOW)


def test_any_of_several_v1_values_may_match_during_a_secret_rotation() -> None:
    good = signing.sign(SECRET, BODY, NOW).split(",")[1]
    header = f"t={NOW},v1={'0' * 64},{good}"
    assert signing.verify(SECRET, BODY, header, now=NOW) == NOW


def test_backoff_is_full_jitter_capped() -> None:
    assert backoff(0, 0.5, 30, rand=lambda: 1.0) == 0.5
    assert backoff(3, 0.5, 30, rand=lambda: 1.0) == 4.0
    assert backoff(10, 0.5, 30, rand=lambda: 1.0) == 30.0
    assert backoff(200, 0.5, 30, rand=lambda: 0.5) == 15.0
    rng = random.Random(7)
    draws = [backoff(4, 0.5, 30, rand=rng.random) for _ in range(1000)]
    assert all(0 <= d <= 8.0 for d in draws) and max(draws) > 7 and min(draws) < 1


def test_config_reads_webhook_settings_when_present() -> None:
    class S:
        webhook_max_attempts = 3
        webhook_timeout_s = 0.5

    cfg = DeliveryConfig.from_settings(S())
    assert (cfg.max_attempts, cfg.timeout_s, cfg.base_s, cfg.cap_s) == (3, 0.5, 0.5, 30.0)


def test_render_passes_an_unknown_type_on_with_its_sequence() -> None:
    p = render(b'{"specversion":"1.0","id":"x.1","type":"needle.future.v9","source":"s","subject":"x",'
               b'"time":"2025-01-01T00:00:00Z","data":{}}', 42)
    assert (p.event_id, p.ce_type, p.grid) == ("x.1", "needle.future.v9", None)
    assert b'"sequence":42' in p.body
