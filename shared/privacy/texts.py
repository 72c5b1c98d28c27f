"""Pure crypto of an issue's free text (no IO: keys and nonces come in).

Free text a person typed about an issue -- the title, description, address and exact point of a report, and
every note, reason and comment after it -- is personal data (PIPL): it names people, doors and disputes. It
travels in the event stream only as AES-256-GCM ciphertext under the issue's own data key (kept outside the
stream, ``shared/privacy/issuekeys.py``). Destroying that key (the retention policy, or by hand) makes every
ciphertext of the issue unreadable for good: crypto-shredding, in a stream that denies deletes.

Wire form. The event's ``data`` keeps its schema: each sealed text field holds ``"[sealed]"`` and a sealed
``location`` is ``null``; the CloudEvents extension attribute ``sealed`` carries
``<key id>.<nonce>.<ciphertext>`` (base64url), the JSON of the clear fields, bound (associated data) to the
issue, the key and the event id, so a ciphertext cannot be moved to another event. needle opens it for
whoever may read the issue; once the key is gone the fields read ``"[erased]"`` (``location``: ``null``).
"""
from __future__ import annotations

import base64
import types
import typing
from functools import cache
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.events.models import Event, Location

SEALED = "[sealed]"
ERASED = "[erased]"
KEY_BYTES = 32
NONCE_BYTES = 12
# the names free text goes by in needle's events; a field is sealed when it has one of these names and holds
# text (or a Location): an enumerated ``reason`` (IssueRouted's RouteReason) stays clear
TEXT_NAMES = frozenset({"title", "description", "location", "note", "reason", "text", "comment", "media_url"})


class Unreadable(ValueError):
    """A sealed text this key cannot open (another key, or the ciphertext or its binding was altered)."""


def _is_text(annotation: Any) -> bool:
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(
        annotation) is typing.Union else (annotation,)
    kinds = {a for a in args if a is not type(None)}
    return kinds == {str} or kinds == {Location}


@cache
def sealed_fields(model: type[Event]) -> tuple[str, ...]:
    """The fields of an event type that hold free text and are sealed (derived from the model, pure)."""
    return tuple(name for name, f in model.model_fields.items() if name in TEXT_NAMES and _is_text(f.annotation))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _aad(issue_id: str, key_id: str, event_id: str) -> bytes:
    return f"needle-issue-text:{issue_id}:{key_id}:{event_id}".encode()


def clear_fields(event: Event) -> dict[str, Any]:
    """The event's free text that a seal would hide: its text fields that hold something."""
    out: dict[str, Any] = {}
    for name in sealed_fields(type(event)):
        value = getattr(event, name)
        if value is None or value in (SEALED, ERASED):
            continue
        out[name] = value.model_dump(mode="json") if isinstance(value, Location) else value
    return out


def _placeholder(value: Any, word: str) -> Any:
    return None if isinstance(value, Location | dict) else word


def seal(key: bytes, key_id: str, nonce: bytes, issue_id: str, event_id: str, event: Event) -> tuple[Event, str | None]:
    """``event`` with its free text replaced by ``[sealed]`` and the ``sealed`` attribute holding it; an event
    without free text comes back as it is, with None. ``nonce``: 12 random bytes, never reused under one key."""
    fields = clear_fields(event)
    if not fields:
        return event, None
    ct = AESGCM(key).encrypt(nonce, orjson.dumps(fields), _aad(issue_id, key_id, event_id))
    hidden = event.model_copy(update={name: _placeholder(v, SEALED) for name, v in fields.items()})
    return hidden, f"{key_id}.{_b64(nonce)}.{_b64(ct)}"


def key_id_of(token: str) -> str:
    return token.split(".", 1)[0]


def open_fields(key: bytes, issue_id: str, event_id: str, token: str) -> dict[str, Any]:
    """The clear fields a ``sealed`` attribute holds (Unreadable when this key does not open it)."""
    try:
        key_id, nonce, ct = token.split(".")
        plain = AESGCM(key).decrypt(_unb64(nonce), _unb64(ct), _aad(issue_id, key_id, event_id))
    except (InvalidTag, ValueError) as exc:
        raise Unreadable(f"issue {issue_id}: the sealed text of {event_id} does not open with this key") from exc
    fields: dict[str, Any] = orjson.loads(plain)
    return fields


def opened(event: Event, fields: dict[str, Any]) -> Event:
    """``event`` with its sealed fields back in clear."""
    update = {name: Location.model_validate(v) if name == "location" and v is not None else v
              for name, v in fields.items() if name in sealed_fields(type(event))}
    return event.model_copy(update=update)


def erased(event: Event) -> Event:
    """``event`` with every sealed field shown as erased: its key was destroyed (crypto-shredded)."""
    update = {name: _placeholder(getattr(event, name), ERASED) for name in sealed_fields(type(event))
              if getattr(event, name) is not None}
    return event.model_copy(update=update)
