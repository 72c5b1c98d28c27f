"""What to notify (pure: :func:`plan`), how to send it (the :class:`Notifier` interface and its reference
adapter :class:`HttpNotifier`, JSON POSTed to ``NEEDLE_NOTIFY_URL``: an SMS or WeChat gateway sits behind it),
and the texts (deploy/notify/templates.yaml, Chinese and English).

Each notification's ``id`` is ``<event id>/<kind>``: the same event always makes the same ids, so a receiver
dedupes redeliveries by it (the consumer acks an event only after every notification of it got a 2xx)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
import yaml

from shared.config import OrgTree
from shared.domain.errors import NotFound
from shared.domain.issue import IssueState
from shared.events import models as ev
from shared.events.codec import Envelope

KINDS = ("dispatch", "warning", "breach", "resolution")
CLOCK_NAMES = {"zh": {"acknowledge": "签收", "resolve": "办结"}, "en": {"acknowledge": "acknowledge",
                                                                      "resolve": "resolve"}}


@dataclass(frozen=True, slots=True)
class Notification:
    id: str  # "<event id>/<kind>": the receiver's dedupe key
    kind: str  # dispatch | warning | breach | resolution
    to: str  # the contact: a department's duty contact, or the resident's phone (never in the stream)
    recipient: str  # "department:<id>" | "resident:<id>"
    issue: str
    language: str
    text: str
    link: str | None = None

    def body(self) -> dict[str, Any]:
        return asdict(self)


class Notifier(Protocol):
    async def send(self, n: Notification) -> None:
        """Deliver ``n``; raise when it was not accepted (the event is then delivered again, later)."""


class NotifyFailed(Exception):
    pass


class HttpNotifier:
    """The reference adapter: POST the notification as JSON; a 2xx is delivery."""

    def __init__(self, url: str, client: httpx.AsyncClient | None = None, timeout_s: float = 10.0) -> None:
        self.url = url
        self.client = client or httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)

    async def send(self, n: Notification) -> None:
        try:
            r = await self.client.post(self.url, json=n.body(), headers={"Idempotency-Key": n.id})
        except httpx.HTTPError as exc:
            raise NotifyFailed(f"{type(exc).__name__}: {exc}") from None
        if not 200 <= r.status_code < 300:
            raise NotifyFailed(f"the gateway answered {r.status_code}")

    async def close(self) -> None:
        await self.client.aclose()


def load_templates(path: Path) -> dict[str, dict[str, str]]:
    data = yaml.safe_load(path.read_text("utf-8"))
    for lang, texts in data.items():
        missing = [k for k in KINDS if k not in texts]
        if missing:
            raise ValueError(f"{path}: {lang} lacks the templates {missing}")
    return {str(k): {str(kk): str(vv) for kk, vv in v.items()} for k, v in data.items()}


class _Blank(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


def _when(at: datetime, tz: Any) -> str:
    return at.astimezone(tz).strftime("%Y-%m-%d %H:%M")


def relevant(env: Envelope) -> bool:
    return isinstance(env.data, ev.TaskDispatched | ev.SlaWarned | ev.SlaBreached | ev.TaskResolved)


def plan(env: Envelope, state: IssueState, org: OrgTree, templates: dict[str, dict[str, str]], language: str,
         tz: Any, *, resident_phone: str | None = None, link: tuple[str, datetime] | None = None
         ) -> list[Notification]:
    """The notifications one stored event makes (``state``: the issue after it). Pure."""
    e = env.data
    texts = templates[language]
    values = _Blank(issue=state.id, title=state.title, category=state.category, grid=state.grid)
    try:
        values["grid"] = org.area(state.grid).name
    except KeyError:
        pass

    def to_department(kind: str, dept_id: str, task: str, clock: str, due: datetime) -> list[Notification]:
        dept = org.departments.get(dept_id)
        if dept is None or not dept.contact:
            return []
        v = _Blank(values, department=dept.name, task=task, clock=CLOCK_NAMES[language].get(clock, clock),
                   due=_when(due, tz))
        return [Notification(f"{env.id}/{kind}", kind, dept.contact, f"department:{dept.id}", state.id, language,
                             texts[kind].format_map(v))]

    match e:
        case ev.TaskDispatched():
            return to_department("dispatch", e.department, e.task_id, "acknowledge", e.acknowledge_due)
        case ev.SlaWarned() | ev.SlaBreached():
            try:
                task = state.task(e.task_id)
            except NotFound:
                return []
            kind = "warning" if isinstance(e, ev.SlaWarned) else "breach"
            return to_department(kind, task.department, e.task_id, e.clock, e.due)
        case ev.TaskResolved():
            if state.resident is None or not resident_phone or link is None:
                return []
            v = _Blank(values, link=link[0], expires=_when(link[1], tz))
            return [Notification(f"{env.id}/resolution", "resolution", resident_phone,
                                 f"resident:{state.resident.id}", state.id, language,
                                 texts["resolution"].format_map(v), link[0])]
    return []
