"""Bearer tokens: HS256 JWTs signed with a key kept in the data directory (never logged).

Roles and scopes (DESIGN.md): grid_worker ``area:<grid>``, handler ``dept:<department>``,
supervisor ``area:<area>`` (everything below it), integrator, admin; and ``reporter`` (a public app that files
Open311 requests for residents: ``""`` for any grid, or ``area:<area>``; docs/SECURITY.md, "Who files what").
"""
from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt

from shared.files import create_private_once
from shared.revocation import Revocations

ROLES = ("grid_worker", "handler", "supervisor", "integrator", "admin", "reporter")
ISSUER = "needle"
KEY_FILE = "secrets/token.key"


class TokenError(Exception):
    """The token is missing, malformed, expired or not signed by this needle (401)."""


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    role: str
    scope: str  # "area:<id>", "dept:<id>", "*" or ""
    token_id: str
    issued_at: float = 0.0  # the token's ``iat`` (a subject's revocation covers tokens issued before it)
    expires_at: float = float("inf")  # the token's ``exp``: open event streams end then

    @property
    def scope_kind(self) -> str:
        return self.scope.split(":", 1)[0] if ":" in self.scope else self.scope

    @property
    def scope_id(self) -> str:
        return self.scope.split(":", 1)[1] if ":" in self.scope else ""


def key_path(data_dir: Path) -> Path:
    return Path(data_dir) / KEY_FILE


MIN_KEY_BYTES = 32  # HS256 wants at least 256 bits (RFC 7518 §3.2); needle writes 64 hex characters


class TokenKeyError(ValueError):
    """``DIR/secrets/token.key`` is too short to sign tokens safely."""


def check_key(key: bytes) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise TokenKeyError(f"a token key needs at least {MIN_KEY_BYTES} bytes, not {len(key)}")
    return key


def load_or_create_key(data_dir: Path, name: str = KEY_FILE) -> bytes:
    """The secret at ``data_dir/name`` (default: the token key), created (32 random bytes, hex) on first use
    (0600, in a 0700 directory); processes making it at once all end with the same one, never a half-written
    file. An existing key shorter than 32 bytes (an empty file, a typed-in word) is refused: anyone could guess
    it and mint an admin token."""
    path = Path(data_dir) / name
    key = create_private_once(path, secrets.token_hex(32)).strip().encode()
    if len(key) < MIN_KEY_BYTES:
        raise TokenKeyError(f"{path} holds {len(key)} bytes; a token key needs at least {MIN_KEY_BYTES} "
                            f"(delete it to have a new random one made, then issue tokens again)")
    return key


def validate_scope(role: str, scope: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    want = {"grid_worker": "area", "handler": "dept", "supervisor": "area"}.get(role)
    if want and not scope.startswith(f"{want}:"):
        raise ValueError(f"role {role} needs scope {want}:<id>, got {scope!r}")
    if role == "reporter" and scope and not scope.startswith("area:"):
        raise ValueError(f"role reporter takes no scope (any grid) or area:<id>, got {scope!r}")


# Default lifetimes (docs/SECURITY.md, "Token subjects and lifetimes"): an admin token lasts a working day;
# people's tokens a week (re-issued, or revoked by subject, when someone leaves); machines' (integrators,
# public apps) a quarter, to be rotated
DEFAULT_TTL_S: dict[str, int] = {"admin": 8 * 3600, "grid_worker": 7 * 86400, "handler": 7 * 86400,
                                 "supervisor": 7 * 86400, "integrator": 90 * 86400, "reporter": 90 * 86400}


def new_subject(role: str, scope: str, suffix: str | None = None) -> str:
    """A subject of its own for one token holder: ``role:scope:<8 hex>`` (idempotency keys, rate buckets, the
    audit actor and subject revocation are then this holder's alone, not every worker's of the grid)."""
    return f"{role}:{scope or '-'}:{suffix or secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class TokenPlan:
    subject: str
    ttl_s: int
    generated: bool  # the subject was made up here: tell the operator which it is


def plan_token(role: str, scope: str, subject: str | None, ttl_s: int | None) -> TokenPlan:
    """What ``needle token issue`` issues: the given subject or a new one; the given lifetime or the role's."""
    validate_scope(role, scope)
    if subject is not None and not subject.strip():
        raise ValueError("--subject must not be empty")
    ttl = DEFAULT_TTL_S[role] if ttl_s is None else ttl_s
    if ttl <= 0:
        raise ValueError(f"--ttl must be positive, got {ttl}")
    return TokenPlan(subject or new_subject(role, scope), ttl, subject is None)


def issue_token(key: bytes, *, role: str, scope: str, subject: str | None = None, ttl_s: int = 30 * 86400,
                now: float | None = None) -> str:
    validate_scope(role, scope)
    check_key(key)
    now = time.time() if now is None else now
    claims = {
        "iss": ISSUER,
        "sub": subject or f"{role}:{scope or '-'}",  # the CLI always names one (plan_token); tests may not
        "role": role,
        "scope": scope,
        "iat": int(now),
        "exp": int(now + ttl_s),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm="HS256")


class TokenVerifier:
    """Verifies tokens; remembers recent good ones so the hot path skips the HMAC. ``revocations`` is
    consulted on every call, cache hit or not (the bucket follower updates it in place)."""

    def __init__(self, key: bytes, cache_size: int = 10_000, revocations: Revocations | None = None) -> None:
        self._key = check_key(key)
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._cache_size = cache_size
        self.revocations = revocations if revocations is not None else Revocations()

    @property
    def revoked(self) -> set[str]:
        """The revoked token ids (the revocations' set itself: adding to it revokes)."""
        return self.revocations.jtis

    def is_revoked(self, p: Principal) -> bool:
        return self.revocations.is_revoked(p.token_id, p.subject, p.issued_at)

    def verify(self, token: str, now: float | None = None) -> Principal:
        now = time.time() if now is None else now
        hit = self._cache.get(token)
        if hit is not None and hit[1] > now:
            if self.is_revoked(hit[0]):
                raise TokenError("token revoked")
            return hit[0]
        try:  # expiry is checked against ``now`` below, not against the library's clock
            claims = jwt.decode(token, self._key, algorithms=["HS256"], issuer=ISSUER,
                                options={"require": ["exp", "iat", "sub", "jti"], "verify_exp": False,
                                         "verify_iat": False})
        except jwt.InvalidSignatureError as exc:
            raise TokenError("invalid token: its signature does not match this needle's key; issue it with "
                             "`needle token issue --data-dir DIR` on the data dir this needle runs on") from exc
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token: {exc}") from exc
        if not isinstance(claims.get("exp"), int | float) or claims["exp"] <= now:
            raise TokenError("token expired")
        role, scope = claims.get("role"), claims.get("scope", "")
        if role not in ROLES or not isinstance(scope, str):
            raise TokenError("token has no valid role")
        if not isinstance(claims.get("iat"), int | float):
            raise TokenError("invalid token")
        p = Principal(subject=str(claims["sub"]), role=role, scope=scope, token_id=str(claims["jti"]),
                      issued_at=float(claims["iat"]), expires_at=float(claims["exp"]))
        if self.is_revoked(p):
            raise TokenError("token revoked")
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[token] = (p, float(claims["exp"]))
        return p
