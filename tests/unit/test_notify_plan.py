"""What the notifier sends (services/notify/notifier.py ``plan``, pure): given stored events and the issue's
state, a dispatch, a warning and a breach go to the department's duty contact (none without a contact), the
resolution to the resident's phone with the 回访 link; ids are stable per event; texts in zh and en."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.notify.notifier import load_templates, plan
from shared.config import parse_org
from shared.domain.issue import fold
from shared.events import models as ev
from shared.events.codec import Envelope

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = load_templates(ROOT / "deploy/notify/templates.yaml")
ORG_TEXT = (ROOT / "tests/fixtures/contract_org.yaml").read_text().replace(
    "{id: dinghai-roads, name: 定海区交通运输局, kind: transport, area: dinghai}",
    '{id: dinghai-roads, name: 定海区交通运输局, kind: transport, area: dinghai, contact: "+8613900000001"}')
ORG = parse_org(ORG_TEXT)
T0 = datetime(2026, 11, 2, 2, 0, tzinfo=UTC)


def dispatched(dept: str) -> ev.TaskDispatched:
    return ev.TaskDispatched(task_id="i1-1", department=dept, role="lead", level="district", clock="natural",
                             dispatched_at=T0, acknowledge_due=T0 + timedelta(minutes=30),
                             resolve_due=T0 + timedelta(days=1), acknowledge_warn=T0 + timedelta(minutes=24),
                             resolve_warn=T0 + timedelta(hours=19))


def env(e: ev.Event, n: int) -> Envelope:
    return Envelope(id=f"i1.{n}", source="t", subject="i1", time=T0, data=e, seq=n)


def state(*events: ev.Event):  # type: ignore[no-untyped-def]
    reported = ev.IssueReported(grid="wuxing-g1", category="road_damage", title="路面塌陷", reporter="gw",
                                reported_at=T0, resident=ev.ResidentRef(id="r1", key_id="k", ciphertext="x",
                                                                        nonce="y"))
    return fold("i1", [(e, i + 1) for i, e in enumerate((reported, *events))])


def test_a_dispatch_a_warning_and_a_breach_go_to_the_duty_contact() -> None:
    d = dispatched("dinghai-roads")
    s = state(d)
    [n] = plan(env(d, 2), s, ORG, TEMPLATES, "zh", UTC)
    assert (n.id, n.kind, n.to, n.recipient) == ("i1.2/dispatch", "dispatch", "+8613900000001",
                                                 "department:dinghai-roads")
    assert "定海区交通运输局" in n.text and "路面塌陷" in n.text and "2026-11-02 02:30" in n.text
    w = ev.SlaWarned(task_id="i1-1", clock="resolve", due=T0 + timedelta(days=1))
    b = ev.SlaBreached(task_id="i1-1", clock="acknowledge", due=T0 + timedelta(minutes=30))
    assert [x.kind for x in plan(env(w, 3), state(d, w), ORG, TEMPLATES, "en", UTC)] == ["warning"]
    [nb] = plan(env(b, 3), state(d, b), ORG, TEMPLATES, "en", UTC)
    assert nb.text.startswith("[Overdue] 定海区交通运输局") and "acknowledge" in nb.text
    # a department without a contact: nothing to send
    other = dispatched("dinghai-police")
    assert plan(env(other, 2), state(other), ORG, TEMPLATES, "zh", UTC) == []


def test_the_resolution_goes_to_the_resident_with_the_link_and_no_name() -> None:
    d = dispatched("dinghai-roads")
    r = ev.TaskResolved(task_id="i1-1", by="h", at=T0 + timedelta(hours=2))
    s = state(d, r)
    link = ("https://needle.example/f/i1/123.sig", T0 + timedelta(hours=74))
    [n] = plan(env(r, 3), s, ORG, TEMPLATES, "zh", UTC, resident_phone="+8613800000000", link=link)
    assert (n.id, n.to, n.recipient, n.link) == ("i1.3/resolution", "+8613800000000", "resident:r1", link[0])
    assert link[0] in n.text and "2026-11-05 04:00" in n.text
    # no phone (forgotten) or no link: nothing
    assert plan(env(r, 3), s, ORG, TEMPLATES, "zh", UTC, resident_phone=None, link=link) == []
