"""Identifiers. Pure: time and randomness come in as arguments.

* Issue ids are 26 characters of Crockford base32: 10 for the report time in ms (so they sort
  by time), 16 random; or, for a report with an Idempotency-Key, a hash of the reporter and the
  key, so that the stream itself remembers the key forever (a new issue must be the first event
  on its subject: a replay after JetStream's duplicate window still meets an OCC conflict).
* Task ids are ``<issue id>-<n>``: the task names its issue, so ``/v1/tasks/{id}`` finds it.
"""
from __future__ import annotations

import hashlib
import re

from .errors import Invalid

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # 10 bits -> two digits: half the steps of one by one


def _b32(value: int, length: int) -> str:
    """The low ``5 * length`` bits of ``value`` as ``length`` digits, most significant first."""
    out = []
    for _ in range(length // 2):
        out.append(_PAIRS[value & 1023])
        value >>= 10
    if length % 2:  # the odd, most significant digit: last in, first out
        out.append(_ALPHABET[value & 31])
    return "".join(reversed(out))


def new_issue_id(now_ms: int, random80: int) -> str:
    return _b32(now_ms, 10) + _b32(random80, 16)


def idempotent_issue_id(reporter: str, key: str) -> str:
    digest = hashlib.sha256(f"{reporter}\x00{key}".encode()).digest()
    return "k" + _b32(int.from_bytes(digest[:16], "big"), 25)


def task_id(issue_id: str, ordinal: int) -> str:
    return f"{issue_id}-{ordinal}"


# What a path may carry as an id (also published in the OpenAPI document). Anything else is refused with 422
# naming the path parameter before it reaches a NATS subject: ``*`` or ``>`` there would be a wildcard read.
ISSUE_ID_PATTERN = "^[0-9a-hjkmnp-tv-z]{1,40}$"
TASK_ID_PATTERN = "^[0-9a-hjkmnp-tv-z]{1,40}-[0-9]{1,6}$"
_ISSUE_ID = re.compile(ISSUE_ID_PATTERN)
_TASK_ID = re.compile(TASK_ID_PATTERN)


def issue_of_task(task: str, field: str = "task_id") -> str:
    """The issue id a task id names; 422 (``Invalid`` naming ``field``) for what cannot be a task id."""
    if not _TASK_ID.fullmatch(task):
        raise Invalid(f"{field} must be <issue id>-<n> (lower-case Crockford base32, then digits)", field=field)
    return task.rpartition("-")[0]


def check_issue_id(issue_id: str, field: str = "issue_id") -> str:
    """``issue_id`` when it can be an issue id; 422 (``Invalid`` naming ``field``) otherwise."""
    if not _ISSUE_ID.fullmatch(issue_id):
        raise Invalid(f"{field} must be 1-40 lower-case Crockford base32 characters", field=field)
    return issue_id


def check_idempotency_key(key: str) -> str:
    if not (1 <= len(key) <= 200) or not key.isprintable():
        raise Invalid("Idempotency-Key must be 1-200 printable characters", field="Idempotency-Key")
    return key
