"""NATS users of the embedded server: ``needle`` (the services) and ``integrator`` (read-only).

An integrator reads ``needle.events.>`` through its own JetStream consumers on NEEDLE_EVENTS
(create, fetch, ack); it may not publish into the event stream, touch needle's own consumers,
or reach the NEEDLE_TIMERS stream or any other JetStream API. Passwords are generated
once and kept in ``DIR/secrets/nats.json`` (mode 600)."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from shared.events import subjects as sj
from shared.files import private_dir

USERS_FILE = "secrets/nats.json"
EV = sj.EVENTS_STREAM

INTEGRATOR_PUBLISH = [
    "$JS.API.INFO",
    f"$JS.API.STREAM.INFO.{EV}",
    f"$JS.API.CONSUMER.CREATE.{EV}",
    f"$JS.API.CONSUMER.CREATE.{EV}.>",
    f"$JS.API.CONSUMER.DURABLE.CREATE.{EV}.>",
    f"$JS.API.CONSUMER.INFO.{EV}.>",
    f"$JS.API.CONSUMER.DELETE.{EV}.>",
    f"$JS.API.CONSUMER.MSG.NEXT.{EV}.>",
    f"$JS.API.DIRECT.GET.{EV}",
    f"$JS.API.DIRECT.GET.{EV}.>",
    f"$JS.ACK.{EV}.>",
    "$JS.FC.>",
]
# Only through JetStream consumers: a core subscription to needle.events.> would also see the messages
# of an atomic batch that JetStream refused (never stored), so integrators get no core access to it.
INTEGRATOR_SUBSCRIBE = ["_INBOX.>"]
# needle's own consumers are off limits (webhook-<id> consumers cannot be matched by a wildcard: they
# are named by random ids that integrators are never shown)
INTERNAL_CONSUMERS = ("router", "projections")
INTEGRATOR_DENY_PUBLISH = [
    f"$JS.API.CONSUMER.{verb}.{EV}.{name}"
    for name in INTERNAL_CONSUMERS
    for verb in ("DELETE", "MSG.NEXT", "DURABLE.CREATE", "INFO")
] + [f"$JS.API.CONSUMER.CREATE.{EV}.{name}" for name in INTERNAL_CONSUMERS] + [
    f"$JS.API.CONSUMER.CREATE.{EV}.{name}.>" for name in INTERNAL_CONSUMERS] + [
    f"$JS.ACK.{EV}.{name}.>" for name in INTERNAL_CONSUMERS]


def load_or_create_passwords(data_dir: Path) -> dict[str, str]:
    path = Path(data_dir) / USERS_FILE
    if path.exists():
        data: dict[str, str] = json.loads(path.read_text())
        return data
    private_dir(path.parent)
    data = {"needle": secrets.token_urlsafe(24), "integrator": secrets.token_urlsafe(24)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return data


def authorization_block(passwords: dict[str, str], *, from_env: bool = False) -> str:
    """The ``authorization {...}`` block; ``from_env`` writes the values of ``passwords`` as
    nats-server environment references (``$NEEDLE_NATS_PASSWORD``) instead of literals."""
    def pw(user: str) -> str:
        return f"${passwords[user]}" if from_env else json.dumps(passwords[user])

    def arr(items: list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    return "\n".join([
        "authorization {",
        "  users: [",
        f'    {{user: "needle", password: {pw("needle")}}}',
        f'    {{user: "integrator", password: {pw("integrator")},',
        f"      permissions: {{publish: {{allow: {arr(INTEGRATOR_PUBLISH)}, deny: {arr(INTEGRATOR_DENY_PUBLISH)}}},",
        f"                    subscribe: {{allow: {arr(INTEGRATOR_SUBSCRIBE)}}}}}}}",
        "  ]",
        "}",
    ])


def url_for(user: str, password: str, port: int, host: str = "127.0.0.1") -> str:
    return f"nats://{user}:{password}@{host}:{port}"


def nats_servers(url: str) -> list[str]:
    """``NEEDLE_NATS_URL`` may name several servers of one cluster, comma-separated; nats-py wants
    a list (a single string is taken as one server)."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise ValueError("empty NATS URL")
    return servers
