"""Stream definitions: NEEDLE_EVENTS (the source of truth) and NEEDLE_TIMERS (durable SLA clocks).

Created through the raw JetStream API so that the 2.12+ fields (allow_atomic,
allow_msg_schedules) pass through whatever nats-py knows about."""
from __future__ import annotations

import json
from dataclasses import dataclass

from nats.aio.client import Client as NATS

from shared.events import subjects as sj

from .settling import JetStreamRefused
from .timers_migration import migrate_timers_stream


@dataclass(frozen=True)
class StreamOptions:
    replicas: int = 1
    duplicate_window_s: float = 120.0


def events_stream_config(opts: StreamOptions) -> dict[str, object]:
    return {
        "name": sj.EVENTS_STREAM,
        "subjects": [sj.ALL_EVENTS],
        "storage": "file",
        "retention": "limits",
        "num_replicas": opts.replicas,
        "duplicate_window": int(opts.duplicate_window_s * 1e9),
        "deny_delete": True,
        "deny_purge": True,
        "allow_direct": True,
        "allow_atomic": True,
        "discard": "old",
    }


def timers_stream_config(opts: StreamOptions) -> dict[str, object]:
    """Work-queue retention bounds the stream: it holds the pending schedules (one per issue with a clock
    running) and the fired timers the router has not acknowledged yet; an acked one is deleted. (Message
    schedules are allowed on a work-queue stream; max_age would also expire pending schedules, and interest
    retention drops messages no consumer is interested in, which pending schedules are.)"""
    return {
        "name": sj.TIMERS_STREAM,
        "subjects": [f"{sj.TIMERS_ROOT}.>"],
        "storage": "file",
        "retention": "workqueue",
        "num_replicas": opts.replicas,
        "allow_msg_schedules": True,
        "allow_direct": True,
        "discard": "old",
    }


class StreamSetupError(JetStreamRefused):
    """JetStream refused to create or update a stream; ``err_code`` is its error code (``retry_helps`` in
    shared/store/settling.py tells a cluster still settling from a refusal that stays)."""


async def _create_or_update(nc: NATS, config: dict[str, object]) -> dict[str, object]:
    name = config["name"]
    resp = json.loads((await nc.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(config).encode(), timeout=10)).data)
    err = resp.get("error")
    if err and err.get("err_code") == 10058:  # stream name already in use: update to the wanted config
        resp = json.loads((await nc.request(f"$JS.API.STREAM.UPDATE.{name}", json.dumps(config).encode(),
                                            timeout=10)).data)
        err = resp.get("error")
    if err:
        raise StreamSetupError(f"stream {name}: {err.get('description')} (err_code {err.get('err_code')})",
                               err.get("err_code"))
    return resp


async def ensure_streams(nc: NATS, opts: StreamOptions | None = None) -> None:
    opts = opts or StreamOptions()
    await _create_or_update(nc, events_stream_config(opts))
    timers = timers_stream_config(opts)
    await migrate_timers_stream(nc, timers)  # streams of earlier versions: limits retention
    await _create_or_update(nc, timers)
