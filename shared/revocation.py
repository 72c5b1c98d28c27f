"""Revoked tokens, as a pure set of facts: token ids (``jti``) and subjects revoked up to an instant.

The facts live in the JetStream KV bucket ``NEEDLE_REVOKED`` (shared/store/revocations.py) and every
process that verifies tokens follows it; this module only knows their keys, values and the rule:

* ``jti.<jti>`` -> ``{"at": ..., "by": ...}``: that one token is refused.
* ``sub.<base64url(subject)>`` -> ``{"before": t, ...}``: every token of ``subject`` issued at or before
  ``t`` (unix seconds) is refused. ``iat`` has whole seconds, so a token issued in the same second as the
  revocation is refused too (fail safe): issue the new token a second later.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

import orjson

JTI_PREFIX = "jti."
SUBJECT_PREFIX = "sub."
_JTI = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # what a KV key token may hold; our jtis are 32 hex digits


def check_jti(jti: str) -> str:
    if not _JTI.match(jti):
        raise ValueError(f"not a token id (jti): {jti!r} (letters, digits, '-' and '_', at most 128)")
    return jti


def jti_key(jti: str) -> str:
    return JTI_PREFIX + check_jti(jti)


def subject_key(subject: str) -> str:
    if not subject:
        raise ValueError("subject must not be empty")
    return SUBJECT_PREFIX + base64.urlsafe_b64encode(subject.encode()).decode().rstrip("=")


def subject_of_key(key: str) -> str:
    raw = key.removeprefix(SUBJECT_PREFIX)
    subject = base64.b64decode(raw + "=" * (-len(raw) % 4), altchars=b"-_", validate=True).decode()
    if not subject:
        raise ValueError("empty subject")
    return subject


def jti_value(*, at: float, by: str) -> bytes:
    return orjson.dumps({"at": at, "by": by})


def subject_value(*, before: float, by: str) -> bytes:
    return orjson.dumps({"before": before, "at": before, "by": by})


@dataclass
class Revocations:
    """What is revoked, as known to this process (filled by the bucket follower)."""

    jtis: set[str] = field(default_factory=set)
    subjects: dict[str, float] = field(default_factory=dict)  # subject -> tokens issued at or before are revoked
    seq: int = 0  # the last bucket revision applied

    def is_revoked(self, jti: str, subject: str, issued_at: float) -> bool:
        if jti in self.jtis:
            return True
        before = self.subjects.get(subject)
        return before is not None and issued_at <= before

    def apply(self, key: str, value: bytes | None, seq: int = 0) -> None:
        """One bucket entry; ``value`` None (a delete or purge) lifts the revocation."""
        self.seq = max(self.seq, seq)
        if key.startswith(JTI_PREFIX):
            jti = key.removeprefix(JTI_PREFIX)
            if value:
                self.jtis.add(jti)
            else:
                self.jtis.discard(jti)
        elif key.startswith(SUBJECT_PREFIX):
            try:
                subject = subject_of_key(key)
            except (ValueError, binascii.Error):  # not written by needle: nothing it could match
                return
            if not value:
                self.subjects.pop(subject, None)
                return
            try:
                before = float(orjson.loads(value)["before"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                return
            self.subjects[subject] = before
