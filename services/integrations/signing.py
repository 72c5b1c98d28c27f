"""Webhook signatures, Stripe style: ``Needle-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``.

The MAC covers ``f"{t}.".encode() + body`` with the webhook's secret, so a receiver checks both that
the body came from needle unchanged and that it is recent (``t`` inside a tolerance window, which
bounds replays). Pure: time comes in as an argument.
"""
from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "Needle-Signature"
SCHEME = "v1"
DEFAULT_TOLERANCE_S = 300


class SignatureError(ValueError):
    """The signature header is missing, malformed, stale or does not match."""


def mac(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), b"%d." % t + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, t: int) -> str:
    """The ``Needle-Signature`` header value for ``body`` sent at unix time ``t``."""
    return f"t={t},{SCHEME}={mac(secret, t, body)}"


def parse(header: str) -> tuple[int, list[str]]:
    """``t=..,v1=..[,v1=..]`` -> (t, [v1 signatures]); several v1 values may appear during a secret rotation."""
    t: int | None = None
    sigs: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError(f"malformed signature element {part!r}")
        if key == "t":
            if not value.isdigit():
                raise SignatureError("signature timestamp is not a unix time")
            t = int(value)
        elif key == SCHEME:
            sigs.append(value)
    if t is None:
        raise SignatureError("signature has no timestamp")
    if not sigs:
        raise SignatureError(f"signature has no {SCHEME} value")
    return t, sigs


def verify(secret: str, body: bytes, header: str | None, *, tolerance_s: float = DEFAULT_TOLERANCE_S,
           now: float | None = None) -> int:
    """Check a received webhook; returns its timestamp, or raises :class:`SignatureError`."""
    if not header:
        raise SignatureError(f"missing {HEADER} header")
    t, sigs = parse(header)
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_s:
        raise SignatureError(f"signature timestamp outside the {tolerance_s:g} s tolerance window")
    want = mac(secret, t, body)
    if not any(hmac.compare_digest(want, s) for s in sigs):
        raise SignatureError("signature does not match")
    return t
