"""The webhook service: registrations kept in JetStream KV, one delivery loop per webhook, replay of
parked events. Built by :func:`start_webhooks`; the HTTP app reaches it as ``AppContext.webhooks``.

Run delivery in ONE process per deployment: two processes bound to the same ``webhook-<id>`` consumer
would still deliver every event at least once, but could interleave one issue's events.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass, replace
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from shared.config import OrgTree
from shared.domain.errors import Unavailable
from shared.events import subjects as sj
from shared.lifecycle import Lifecycle
from shared.privacy.issuekeys import IssueKeys
from shared.settings import Settings
from shared.store.grid_cache import GridCache
from shared.store.settling import settled

from .delivery import Deliverer, DeliveryConfig, Sender, consumer_name, group_of, now_iso, render_opened
from .registry import Registry, Webhook
from .targets import AllowList

log = structlog.get_logger("needle.webhooks")


@dataclass(frozen=True, slots=True)
class ReplayResult:
    replayed: int
    still_failing: int


class WebhookService:
    def __init__(self, nc: NATS, org: OrgTree, registry: Registry, sender: Sender, config: DeliveryConfig,
                 health: dict[str, bool] | None = None, deliver: bool = True, texts: IssueKeys | None = None) -> None:
        self.texts = texts  # the issues' data keys: receivers get the free text opened
        self.deliver = deliver  # False in an extra intake worker: it registers, the first process delivers
        self.nc, self.js, self.org = nc, nc.jetstream(), org
        self.registry, self.sender, self.config = registry, sender, config
        self.grids = GridCache()
        self.health = health if health is not None else {}
        self.running: dict[str, tuple[Deliverer, asyncio.Task[None]]] = {}

    def _config(self) -> DeliveryConfig:
        return self.config  # read at each use: tests and operators may swap it while running

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.deliver:
            await self.sync()
        self.health["webhooks"] = True

    async def sync(self) -> None:
        """Deliver for every registered webhook and for no other (registrations made by another process)."""
        hooks = await self.registry.all()
        for hook in hooks:
            if hook.id not in self.running:
                self._launch(Deliverer(hook, self.js, self.org, self.grids, self.sender, self.registry,
                                       self._config, self.texts))
        gone = set(self.running) - {h.id for h in hooks}
        for hook_id in gone:
            await self._stop(hook_id)

    async def follow_registry(self, interval_s: float = 2.0) -> None:
        """With several intake workers a webhook may be registered or removed by another process: the
        delivering process picks that up within ``interval_s``."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: the next round tries again
                log.warning("webhook registry not read", error=repr(exc))

    def _launch(self, d: Deliverer) -> None:
        if d.hook.id in self.running:
            return
        task = asyncio.create_task(self._guard(d), name=f"webhook-{d.hook.id}")
        self.running[d.hook.id] = (d, task)

    async def _guard(self, d: Deliverer) -> None:
        while True:  # a delivery loop never stays dead: log, pause, start again
            try:
                await d.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook loop crashed; restarting", webhook=d.hook.id)
                d.sub = None
                await asyncio.sleep(1.0)

    async def _stop(self, hook_id: str) -> Deliverer | None:
        item = self.running.pop(hook_id, None)
        if item is None:
            return None
        d, task = item
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return d

    async def close(self) -> None:
        for hook_id in list(self.running):
            await self._stop(hook_id)

    # -- registrations -----------------------------------------------------------------------------
    async def register(self, *, url: str, types: tuple[str, ...], area: str | None, secret: str,
                       owner: str) -> Webhook:
        """Stores the registration, creates its consumer (events after the stream's current end), starts it."""
        info = await self.js.stream_info(sj.EVENTS_STREAM)
        hook = Webhook(id="wh" + secrets.token_hex(10), url=url, types=types, area=area, secret=secret, owner=owner,
                       created_at=now_iso(), start_seq=int(info.state.last_seq) + 1)
        await self.registry.create(hook)
        d = Deliverer(hook, self.js, self.org, self.grids, self.sender, self.registry, self._config, self.texts)
        with contextlib.suppress(Exception):  # if it fails here the loop keeps trying from hook.start_seq
            await d.subscribe()
        if self.deliver:
            self._launch(d)
        return hook

    async def remove(self, hook: Webhook) -> None:
        d = await self._stop(hook.id)
        consumer = d.consumer if d is not None else consumer_name(hook.id)
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(sj.EVENTS_STREAM, consumer)
        await self.registry.delete(hook.id)
        await self.registry.drop_dead_letters(hook.id)

    def counters(self, hook_id: str) -> dict[str, int] | None:
        item = self.running.get(hook_id)
        if item is None:
            return None
        c = item[0].counters
        return {"delivered": c.delivered, "failed_attempts": c.failed_attempts, "parked": c.parked,
                "filtered": c.filtered}

    async def progress(self, hook_id: str) -> dict[str, int] | None:
        """Where the webhook's consumer stands, as JetStream knows it: the same in every process, whichever
        delivers. ``pending``: events under its filter not yet handed out (a filter shared by several types
        also counts the others, skipped when they come); ``in_flight``: handed out, not yet acknowledged;
        ``acknowledged_through_seq``: every event up to this stream sequence is done (delivered, skipped or
        parked) or was written before the webhook existed. None while the consumer does not exist (it is
        being created)."""
        try:
            info = await self.js.consumer_info(sj.EVENTS_STREAM, consumer_name(hook_id))
        except NotFoundError:
            return None
        except TimeoutError as exc:  # nats-py's TimeoutError is one
            raise Unavailable("JetStream did not say where the webhook stands; retry") from exc
        return {"pending": int(info.num_pending or 0), "in_flight": int(info.num_ack_pending or 0),
                "acknowledged_through_seq": int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0}

    # -- dead letters ------------------------------------------------------------------------------
    async def replay(self, hook: Webhook) -> ReplayResult:
        """Delivers every parked event once more (one attempt each), oldest first; one issue's events in
        order, stopping at its first failure. Delivered ones leave the dead-letter bucket."""
        letters = await self.registry.dead_letters(hook.id)
        groups: dict[str, list[Any]] = {}
        for letter in letters:
            groups.setdefault(group_of(letter.subject), []).append(letter)
        sem = asyncio.Semaphore(self.config.concurrency)
        replayed = 0

        async def one_group(group: list[Any]) -> None:
            nonlocal replayed
            async with sem:
                for letter in group:
                    try:
                        raw = await self.js.get_msg(sj.EVENTS_STREAM, seq=letter.seq, direct=True)
                        ok, status, error = await self._send_once(hook, raw.data or b"", letter.seq)
                    except Exception as exc:
                        ok, status, error = False, None, f"could not read the event: {exc!r}"[:300]
                    if ok:
                        await self.registry.unpark(hook.id, letter.seq)
                        replayed += 1
                        continue
                    await self.registry.park(replace(letter, attempts=letter.attempts + 1, status=status,
                                                     error=error, parked_at=now_iso()))
                    return  # later events of this issue stay parked, in order

        await asyncio.gather(*(one_group(g) for g in groups.values()))
        return ReplayResult(replayed=replayed, still_failing=len(letters) - replayed)

    async def _send_once(self, hook: Webhook, data: bytes, seq: int) -> tuple[bool, int | None, str | None]:
        out = await self.sender.send(hook, await render_opened(data, seq, self.texts), self.config.timeout_s)
        return out.ok, out.status, out.error


async def start_webhooks(life: Lifecycle, nc: NATS, org: OrgTree, settings: Settings,
                         config: DeliveryConfig | None = None, sender: Sender | None = None,
                         texts: IssueKeys | None = None) -> WebhookService:
    """Opens the KV buckets and restarts every registered webhook's delivery (API routes: ``webhooks_api.router``)."""
    config = config or DeliveryConfig.from_settings(settings)
    js = nc.jetstream()
    registry = await settled("webhook buckets", lambda: Registry.open(js, replicas=settings.stream_replicas),
                             within_s=settings.start_timeout_s)
    sender = sender or Sender.pooled(allow=AllowList.parse(config.allow_private))
    service = WebhookService(nc, org, registry, sender, config, health=life.health, deliver=settings.webhook_delivery,
                             texts=texts)
    life.on_close(sender.client.aclose)
    life.on_close(service.close)  # closers run last-first: the loops stop before the client closes
    await service.start()
    if service.deliver and settings.workers > 1:  # the other workers register and remove webhooks too
        life.spawn("webhook-registry", service.follow_registry())
    return service
