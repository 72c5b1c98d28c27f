"""The resident use cases shared by every entry point: seal a reported resident, show one to a reader,
forget one (crypto-shredding)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from shared.domain.errors import Unavailable
from shared.events import subjects as sj
from shared.events.codec import Envelope, encode
from shared.events.models import IssueReported, ResidentForgotten, ResidentRef

from . import sealing
from .keystore import Forgotten, KeyStoreError, ResidentKey, ResidentKeys, new_resident_id

# Who reads residents in clear: everyone who may read the issue (its grid's workers, handlers of its
# tasks, supervisors above its grid, admins) except integrators, who see the resident's id only.
CLEAR_READERS = frozenset({"grid_worker", "handler", "supervisor", "admin"})


@dataclass(frozen=True, slots=True)
class Sealed:
    ref: ResidentRef
    fingerprint: str  # HMAC of the clear data under the resident's key (idempotency checks)


async def seal_resident(keys: ResidentKeys, *, resident_id: str | None, name: str | None,
                        phone: str | None) -> Sealed:
    """Find or make the resident's key (by the given id, else by phone, else a new resident) and seal
    ``name`` and ``phone`` (already normalized) with it."""
    try:
        if resident_id:
            key = await keys.key_for_id(resident_id)
        elif phone:
            key = await keys.key_for_phone(phone)
        else:  # a name alone: a resident of its own, forgotten by its id
            key = await keys.key_for_id(new_resident_id())
        if resident_id and phone:  # forgetting the phone must reach this resident too
            await keys.link_phone(phone, key.resident_id)
    except (NatsError, TimeoutError, KeyStoreError) as exc:
        raise Unavailable("residents' keys are not available; retry") from exc
    data = sealing.ResidentData(name=name, phone=phone)
    ref = sealing.seal(key.key, os.urandom(sealing.NONCE_BYTES), key.resident_id, key.key_id, data)
    return Sealed(ref, sealing.fingerprint(key.key, data))


async def resident_view(keys: ResidentKeys | None, ref: ResidentRef | None, role: str) -> dict[str, Any] | None:
    """What ``role`` sees of a sealed resident: {id} for integrators; {id, name, phone} for the others
    while the key exists; name and phone "[erased]" once it was destroyed."""
    if ref is None:
        return None
    if role not in CLEAR_READERS or keys is None:
        return {"id": ref.id}
    key = await keys.lookup(ref.id)
    if key is not None and key.key_id == ref.key_id:
        try:
            data = sealing.unseal(key.key, ref)
            return {"id": ref.id, "name": data.name, "phone": data.phone, "erased": False}
        except sealing.Unreadable:
            pass
    return {"id": ref.id, "name": sealing.ERASED, "phone": sealing.ERASED, "erased": True}


async def reveal_events(keys: ResidentKeys | None, envs: list[Envelope], role: str) -> list[dict[str, Any]]:
    """CloudEvents of an issue for a reader: a reported resident is shown as ``resident_view`` shows it."""
    out: list[dict[str, Any]] = []
    for env in envs:
        ce = env.to_cloudevent()
        if isinstance(env.data, IssueReported) and env.data.resident is not None:
            ce["data"]["resident"] = await resident_view(keys, env.data.resident, role)
        out.append(ce)
    return out


def resident_id_only(ce: dict[str, Any]) -> bool:
    """Reduce a CloudEvent's sealed resident to ``{id}`` (what push channels carry: webhooks and SSE go
    to integrators). True when it changed ``ce``."""
    data = ce.get("data")
    if not isinstance(data, dict):
        return False
    resident = data.get("resident")
    if isinstance(resident, dict) and set(resident) != {"id"}:
        data["resident"] = {"id": resident.get("id")}
        return True
    return False


def forgotten_envelope(resident_id: str, key_ids: tuple[str, ...], by: str, now: datetime,
                       token: str | None = None) -> Envelope:
    """``token`` (the subject token of the resident, an HMAC) names the event's id and so its Nats-Msg-Id
    header, instead of the id; the data and the CloudEvents subject name the resident."""
    event = ResidentForgotten(resident_id=resident_id, key_ids=key_ids, by=by, at=now)
    return Envelope(id=f"resident.{token or resident_id}.{'.'.join(key_ids) or 'none'}", source="needle/residents",
                    subject=resident_id, time=now, data=event, actor=by)


async def forget(nc: NATS, keys: ResidentKeys, who: str, *, by: str, now: datetime) -> Forgotten:
    """Forget every resident ``who`` names: an id, or a phone (the resident keyed by it and every resident a
    caller reported under its own id with that phone). Each is forgotten as ``forget_one`` does; the result
    names them all (comma-separated) and every key destroyed."""
    found = await keys.find_all(who)
    done = [await forget_one(nc, keys, rid, key, by=by, now=now) for rid, key in found]
    if len(found) > 1 or (found and found[0][0] != who):  # a phone: its links name residents, drop them too
        with contextlib.suppress(ValueError):
            await keys.unlink_phone(sealing.normalize_phone(who))
    return Forgotten(", ".join(dict.fromkeys(f.resident_id for f in done)),
                     tuple(k for f in done for k in f.key_ids))


async def forget_one(nc: NATS, keys: ResidentKeys, resident_id: str, key: ResidentKey | None, *, by: str,
                     now: datetime) -> Forgotten:
    """Record ``resident_forgotten`` (no personal data), then destroy the key. The event goes first, so a
    crash in between leaves a key that a retry destroys; the Nats-Msg-Id makes a retry within the duplicate
    window one event. A resident with no key (unknown, or already forgotten) changes nothing and records
    nothing. The event's NATS subject carries a keyed HMAC of the id, never the id (``subject_token``)."""
    if key is None:
        return Forgotten(resident_id, ())
    try:
        token = await keys.subject_token(resident_id)
        env = forgotten_envelope(resident_id, (key.key_id,), by, now, token)
        msg = await nc.request(sj.resident_event(token, ResidentForgotten.name), encode(env),
                               headers={"Nats-Msg-Id": env.id}, timeout=5)
        ack = orjson.loads(msg.data)
        if "error" in ack:
            raise Unavailable(f"recording resident_forgotten failed: {ack['error']}")
        await keys.destroy(key)
    except (NatsError, TimeoutError) as exc:
        raise Unavailable("the resident could not be forgotten now; retry (it is idempotent)") from exc
    return Forgotten(resident_id, (key.key_id,))
