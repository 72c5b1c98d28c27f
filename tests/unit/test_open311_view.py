"""What an anonymous Open311 reader sees of an issue (services/open311/view.py): the description only when it is
public, never an address Open311 appended to it, never a note. Pure: hand-made events folded, no server."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.open311 import view
from shared.config import load_org, load_rulebook
from shared.domain.issue import IssueState, fold
from shared.events import models as ev
from shared.events.codec import Envelope

ROOT = Path(__file__).resolve().parents[2]
ORG = load_org(ROOT / "tests/fixtures/contract_org.yaml")
RULES = load_rulebook(ROOT / "tests/fixtures/contract_rules.yaml")
T0 = datetime(2026, 3, 4, 2, 0, tzinfo=UTC)
ISSUE = "01issue0000000000000000000"


def reported(**changes: Any) -> ev.IssueReported:
    fields: dict[str, Any] = {"grid": "wuxing-g1", "category": "road_damage", "title": "路面塌陷",
                              "description": "环南路口路面塌陷约一米", "reporter": "gw", "reported_at": T0,
                              "location": ev.Location(lat=30.012345, lon=122.106789, address="环南路88号")}
    return ev.IssueReported(**{**fields, **changes})


def dispatched() -> ev.TaskDispatched:
    day = timedelta(days=1)
    return ev.TaskDispatched(task_id=f"{ISSUE}-1", department="dinghai-roads", role="lead", level="district",
                             clock="natural", dispatched_at=T0, acknowledge_due=T0 + day, resolve_due=T0 + 2 * day,
                             acknowledge_warn=T0 + day, resolve_warn=T0 + day)


def issue(*events: ev.Event) -> tuple[IssueState, list[Envelope]]:
    envs = [Envelope(id=f"{ISSUE}.{n}", source="test", subject=ISSUE, time=T0, data=e, seq=n)
            for n, e in enumerate(events, 1)]
    return fold(ISSUE, [(e.data, e.seq) for e in envs]), envs


def anonymous(*events: ev.Event) -> dict[str, Any]:
    state, envs = issue(*events)
    return view.from_state(ORG, RULES, state, envs, full=False)


def test_the_description_is_shown_anonymously_only_when_public() -> None:
    assert anonymous(reported())["description"] is None
    marked = anonymous(reported(description_public=True))
    assert marked["description"] == "环南路口路面塌陷约一米"
    assert "环南路88号" not in str(marked) and marked["lat"] == 30.012  # still the rounded point, no address
    withdrawn = anonymous(reported(description_public=True),
                          ev.DescriptionPublicationChanged(public=False, by="sup", reason="含门牌号"))
    assert withdrawn["description"] is None and "含门牌号" not in str(withdrawn)
    approved = anonymous(reported(), ev.DescriptionPublicationChanged(public=True, by="sup", reason="审核通过"))
    assert approved["description"] == "环南路口路面塌陷约一米" and "审核通过" not in str(approved)


def test_a_public_description_never_carries_the_address_open311_appended_nor_a_note() -> None:
    text = f"路灯不亮\n\n{view.ADDRESS_LABEL}展茅街道第33网格 张家宕12号"
    req = anonymous(reported(description=text, location=None, description_public=True), dispatched(),
                    ev.TaskResolved(task_id=f"{ISSUE}-1", by="h", note="已联系王先生", at=T0))
    assert req["description"] == "路灯不亮" and "张家宕" not in str(req) and "王先生" not in str(req)
    # only the address: the title stands in for it
    only = anonymous(reported(description=f"{view.ADDRESS_LABEL}张家宕12号", location=None, description_public=True))
    assert only["description"] == "路面塌陷"
    # without a description: the title, as the full view shows it
    assert anonymous(reported(description=None, description_public=True))["description"] == "路面塌陷"


def test_a_list_row_shows_the_title_anonymously_only_when_public() -> None:
    row = {"id": ISSUE, "grid": "wuxing-g1", "category": "road_damage", "title": "路面塌陷", "urgency": "normal",
           "status": "dispatched", "reported_at": T0, "closed_at": None, "lead_department": None, "level": None,
           "updated_at": T0, "resolve_due": None, "description_public": False}
    assert view.from_row(ORG, RULES, row)["description"] is None
    assert view.from_row(ORG, RULES, row, full=True)["description"] == "路面塌陷"
    assert view.from_row(ORG, RULES, row | {"description_public": True})["description"] == "路面塌陷"
