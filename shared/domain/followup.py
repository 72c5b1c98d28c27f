"""The resident's one-time 回访 link: ``/f/<issue id>/<expires>.<signature>``. Pure: key and time are arguments.

The signature is HMAC-SHA256 over the issue id and the expiry under a key kept in the data directory
(``secrets/followup.key``), so a link names exactly one issue (another issue's path with it: 403) and a time
after which it answers 410. "Once" is the issue's state: a recorded resident answer makes the link 410. One link
per issue: the expiry is the resolution time plus the TTL, so asking again gives the same link."""
from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

from .errors import Gone, NotAllowed

SECRET_FILE = "secrets/followup.key"


def _sig(key: bytes, issue_id: str, expires: int) -> str:
    mac = hmac.new(key, f"followup|{issue_id}|{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:18]).decode()


def token(key: bytes, issue_id: str, expires_at: datetime) -> str:
    exp = int(expires_at.timestamp())
    return f"{exp}.{_sig(key, issue_id, exp)}"


def expiry(resolved_at: datetime, ttl: timedelta) -> datetime:
    return datetime.fromtimestamp(int((resolved_at + ttl).timestamp()), UTC)


def check(key: bytes, issue_id: str, tok: str, now: datetime) -> datetime:
    """The link's expiry; NotAllowed (403) for a link not made for this issue, Gone (410) once expired."""
    exp_s, _, sig = tok.partition(".")
    if not exp_s.isdigit() or len(exp_s) > 12 or not hmac.compare_digest(sig.encode(), _sig(key, issue_id,
                                                                                            int(exp_s)).encode()):
        raise NotAllowed("this link was not made for this issue")
    expires_at = datetime.fromtimestamp(int(exp_s), UTC)
    if now >= expires_at:
        raise Gone("this 回访 link has expired")
    return expires_at
