"""Pure crypto and normalization of a resident's personal data (no IO: keys and nonces come in).

A resident's name and phone travel in the event stream only as AES-256-GCM ciphertext under that
resident's own data key. The associated data binds a ciphertext to its resident and key, so it
cannot be replayed under another resident. Destroying the key (``needle forget``) makes every
ciphertext of that resident unreadable for good: crypto-shredding.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

import orjson
import phonenumbers
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.events.models import ResidentRef

ERASED = "[erased]"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce
REGION = "CN"  # numbers without a country code are read as Chinese ones (mobile 1[3-9]…, landline 0580-…)


class Unreadable(ValueError):
    """A sealed resident that this key cannot open (another key, or the ciphertext was altered)."""


@dataclass(frozen=True, slots=True)
class ResidentData:
    name: str | None
    phone: str | None  # E.164


def normalize_phone(raw: str) -> str:
    """A phone number as E.164 (``+8613800138000``); ValueError (without the number) when it is not one."""
    try:
        number = phonenumbers.parse(raw, REGION)
    except Exception:  # NumberParseException, and whatever odd input makes the parser trip on
        raise ValueError("not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("not a valid phone number (a Chinese mobile is 1[3-9] and 9 more digits)")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _aad(resident_id: str, key_id: str) -> bytes:
    return f"needle-resident:{resident_id}:{key_id}".encode()


def seal(key: bytes, nonce: bytes, resident_id: str, key_id: str, data: ResidentData) -> ResidentRef:
    """Encrypt ``data`` for the event stream. ``nonce`` must never repeat under one key (take 12 random bytes)."""
    plain = orjson.dumps({"name": data.name, "phone": data.phone})
    ct = AESGCM(key).encrypt(nonce, plain, _aad(resident_id, key_id))
    return ResidentRef(id=resident_id, key_id=key_id, ciphertext=b64(ct), nonce=b64(nonce))


def unseal(key: bytes, ref: ResidentRef) -> ResidentData:
    if ref.ciphertext is None or ref.nonce is None or ref.key_id is None:
        raise Unreadable(f"resident {ref.id} carries no sealed data")
    try:
        plain = AESGCM(key).decrypt(unb64(ref.nonce), unb64(ref.ciphertext), _aad(ref.id, ref.key_id))
    except (InvalidTag, ValueError) as exc:
        raise Unreadable(f"resident {ref.id}: key {ref.key_id} does not open this data") from exc
    d = orjson.loads(plain)
    return ResidentData(name=d.get("name"), phone=d.get("phone"))


def fingerprint(key: bytes, data: ResidentData) -> str:
    """A digest of ``data`` under the resident's own key, for idempotency checks: equal for equal data,
    and, unlike a plain hash of a phone number, impossible to brute-force once the key is destroyed."""
    return hmac.new(key, orjson.dumps([data.name, data.phone]), hashlib.sha256).hexdigest()


def index_digest(secret: bytes, phone_e164: str) -> str:
    """The key of the phone -> resident index: a keyed HMAC, so the index never holds a phone number."""
    return hmac.new(secret, phone_e164.encode(), hashlib.sha256).hexdigest()[:40]
