"""The rulebook as a recorded fact: ``needle rules publish`` appends RulebookPublished, and every
process (intake, router) follows those events, so the rules can change at run time without a
restart. Issues already dispatched keep their deadlines (they are in their events); new reports
route by the newest rulebook. ``needle up --rules FILE`` publishes FILE when its version is not
the newest one recorded, so the stream always says which rules were in force when."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared.config import Rulebook, parse_rulebook
from shared.events import subjects as sj
from shared.events.codec import Envelope, decode, encode
from shared.events.models import RulebookPublished

log = structlog.get_logger("needle.rules")


def published_event(rulebook: Rulebook, text: str, source: str, by: str) -> RulebookPublished:
    return RulebookPublished(rulebook_version=rulebook.version, source=source, text=text,
                             categories=tuple(sorted(rulebook.categories)), by=by)


async def publish(nc: NATS, rulebook: Rulebook, text: str, source: str, by: str) -> int:
    """Append a RulebookPublished event; returns its stream sequence."""
    event = published_event(rulebook, text, source, by)
    env = Envelope(id=f"rulebook.{rulebook.version}", source="needle/rules", subject=rulebook.version,
                   time=datetime.now(UTC), data=event, actor=by)
    msg = await nc.request(sj.rulebook_event(rulebook.version, event.name), encode(env), timeout=5)
    ack = orjson.loads(msg.data)
    if "error" in ack:
        raise RuntimeError(f"publishing the rulebook failed: {ack['error']}")
    return int(ack["seq"])


async def latest(nc: NATS) -> tuple[Rulebook, int] | None:
    """The newest published rulebook and its sequence, or None when none was ever published."""
    js = nc.jetstream()
    sub = await js.subscribe(f"{sj.EVENTS_ROOT}.rulebook.>", ordered_consumer=True,
                             config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST))
    try:
        msg = await sub.next_msg(timeout=1.0)
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    env = decode(msg.data, msg.metadata.sequence.stream)
    assert isinstance(env.data, RulebookPublished)
    return parse_rulebook(env.data.text, env.data.source, digest=env.data.rulebook_version), env.seq


async def follow(nc: NATS, after_seq: int, apply: Callable[[Rulebook], None]) -> None:
    """Apply every rulebook published after ``after_seq`` as it arrives (runs until cancelled)."""
    js = nc.jetstream()
    sub = await js.subscribe(f"{sj.EVENTS_ROOT}.rulebook.>", ordered_consumer=True,
                             config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                                   opt_start_seq=after_seq + 1))
    try:
        async for msg in sub.messages:
            try:
                env = decode(msg.data, msg.metadata.sequence.stream)
                assert isinstance(env.data, RulebookPublished)
                rb = parse_rulebook(env.data.text, env.data.source, digest=env.data.rulebook_version)
            except Exception as exc:  # a bad rulebook never stops the service: the old one stays in force
                log.error("published rulebook not applied", error=str(exc))
                continue
            apply(rb)
            log.info("rulebook in force", version=rb.version, source=env.data.source)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        raise


async def history(nc: NATS) -> list[tuple[datetime, Rulebook]]:
    """Every rulebook ever published, with when, in stream order (scores pin each month to the one in force)."""
    js = nc.jetstream()
    sub = await js.subscribe(f"{sj.EVENTS_ROOT}.rulebook.>", ordered_consumer=True,
                             config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
    out: list[tuple[datetime, Rulebook]] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except Exception:
                break
            env = decode(msg.data, msg.metadata.sequence.stream)
            if isinstance(env.data, RulebookPublished):
                try:
                    out.append((env.time, parse_rulebook(env.data.text, env.data.source,
                                                         digest=env.data.rulebook_version)))
                except Exception as exc:  # a rulebook that no longer parses was never in force
                    log.error("published rulebook skipped", error=str(exc))
            if msg.metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out
