"""The notifier's durable JetStream consumer: each issue event that makes notifications is acked only after
every one of them got a 2xx from the notifier; a failure leaves it unacked (redelivered after a back-off), and a
restart resumes where the acks stopped. So a notification may be sent again (a crash between the 2xx and the
ack), never lost: the receiver dedupes by the notification id (docs: README "Notifications").

Personal data: the resident's phone is unsealed here, in memory, for the notifier only; nothing is written back
to the stream."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.commanding import load_state
from shared.config import OrgTree, Rulebook
from shared.domain.errors import DomainError
from shared.events import models as ev
from shared.events import subjects as sj
from shared.events.codec import Envelope, UnknownEventType, decode
from shared.lifecycle import Lifecycle
from shared.privacy import sealing
from shared.privacy.keystore import ResidentKeys
from shared.settings import Settings
from shared.store.eventstore import EventStore

from .notifier import HttpNotifier, Notification, Notifier, load_templates, plan, relevant

log = structlog.get_logger("needle.notify")
DURABLE = "notifier"
RETRY_S = (0.5, 1, 2, 5, 10, 30)


class NotifyService:
    def __init__(self, nc: NATS, store: EventStore, org: OrgTree, rulebook: Rulebook, settings: Settings,
                 notifier: Notifier, residents: ResidentKeys | None, health: dict[str, bool] | None = None) -> None:
        self.nc, self.store, self.org, self.rulebook, self.settings = nc, store, org, rulebook, settings
        self.notifier, self.residents = notifier, residents
        self.templates = load_templates(settings.notify_templates)
        self.health = health if health is not None else {}
        self.sent = 0

    async def subscribe(self) -> Any:
        js = self.nc.jetstream()
        return await js.pull_subscribe(
            f"{sj.EVENTS_ROOT}.issue.>", durable=DURABLE, stream=sj.EVENTS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW, ack_wait=60,
                                  max_ack_pending=1000, max_deliver=-1))

    async def notifications(self, env: Envelope) -> list[Notification]:
        state, _ = await load_state(self.store, env.subject)
        phone, link = None, None
        if isinstance(env.data, ev.TaskResolved):
            try:
                lead = state.task(env.data.task_id).role == "lead"
            except DomainError:
                lead = False
            if lead and state.resident is not None:
                phone = await self._phone(state.resident)
                if phone:
                    from services.intake.followup_api import link as followup_link

                    with contextlib.suppress(DomainError):  # reopened since: no link to send
                        link = followup_link(self.settings, state)
        return plan(env, state, self.org, self.templates, self.settings.notify_language, self.rulebook.tz,
                    resident_phone=phone, link=link)

    async def _phone(self, ref: ev.ResidentRef) -> str | None:
        if self.residents is None:
            return None
        key = await self.residents.lookup(ref.id)
        if key is None or key.key_id != ref.key_id:
            return None  # forgotten: nobody to tell
        try:
            return sealing.unseal(key.key, ref).phone
        except sealing.Unreadable:
            return None

    async def handle(self, msg: Any) -> bool:
        """Notify for one message; True when it may be acked."""
        try:
            env = decode(msg.data, msg.metadata.sequence.stream)
        except (UnknownEventType, ValueError):
            return True
        if not relevant(env):
            return True
        for n in await self.notifications(env):
            await self.notifier.send(n)
            self.sent += 1
            log.info("notified", id=n.id, kind=n.kind, issue=n.issue, recipient=n.recipient)
        return True

    async def run(self) -> None:
        sub = None
        failures = 0
        while True:
            try:
                if sub is None:
                    sub = await self.subscribe()
                    self.health["notifier"] = True
                msgs = await sub.fetch(20, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if "Timeout" not in type(exc).__name__:
                    log.warning("notifier fetch failed", error=repr(exc))
                    sub = None
                    await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                try:
                    await self.handle(msg)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # not delivered: leave it (and the rest of the batch) to redelivery
                    delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
                    failures += 1
                    self.health["notifier"] = False
                    log.warning("notification not delivered; retrying", error=repr(exc), retry_in=delay)
                    for m in msgs[msgs.index(msg):]:
                        with contextlib.suppress(Exception):
                            await m.nak(delay=delay)
                    break
                failures = 0
                self.health["notifier"] = True
                await msg.ack_sync()  # after every 2xx of this event, and confirmed by the server


async def start_notifier(life: Lifecycle, nc: NATS, store: EventStore, org: OrgTree, rulebook: Rulebook,
                         settings: Settings, residents: ResidentKeys | None,
                         notifier: Notifier | None = None) -> NotifyService:
    """The notifier of this process (the router's), sending to ``settings.notify_url``."""
    assert settings.notify_url or notifier is not None
    if notifier is None:
        http = HttpNotifier(settings.notify_url or "")
        life.on_close(http.close)
        notifier = http
    service = NotifyService(nc, store, org, rulebook, settings, notifier, residents, health=life.health)
    life.spawn("notifier", service.run())
    return service
