"""The router's reactions (services/router/reactions.py): given an issue's events, when an event or an SLA timer
is the cue, then the events the router appends. Pure: states are folded from events, time is an argument."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.router.reactions import (
    RouterRules,
    TimerEdge,
    dispatch_timer,
    latest_dispatch_timer,
    next_edge,
    on_issue_timer,
    on_timer,
    pending_edges,
    react,
)
from shared.config import load_org, load_rulebook, parse_rulebook
from shared.domain import commands as cmd
from shared.domain.calendar import WorkCalendar
from shared.domain.clocks import SlaClocks
from shared.domain.ids import new_issue_id, task_id
from shared.domain.issue import IssueState, decide, evolve, fold, initial_state
from shared.events import models as ev

ROOT = Path(__file__).resolve().parents[2]
CONTRACT_RULES_TEXT = (ROOT / "tests/fixtures/contract_rules.yaml").read_text(encoding="utf-8")
CONTRACT = RouterRules(org=load_org(ROOT / "tests/fixtures/contract_org.yaml"),
                       rulebook=load_rulebook(ROOT / "tests/fixtures/contract_rules.yaml"),
                       clocks=SlaClocks(WorkCalendar("natural")))
DEMO = RouterRules(org=load_org(ROOT / "deploy/org/zhoushan.yaml"),
                   rulebook=load_rulebook(ROOT / "deploy/rules/zhoushan.yaml"),
                   clocks=SlaClocks(WorkCalendar("cn_workdays")))

BJ = ZoneInfo("Asia/Shanghai")
T0 = datetime(2025, 3, 4, 10, 0, tzinfo=BJ).astimezone(UTC)  # a Tuesday, 10:00 in Beijing
MS = timedelta(milliseconds=1)
MIN = timedelta(minutes=1)
HOUR = timedelta(hours=1)
ISSUE = new_issue_id(int(T0.timestamp() * 1000), 42)


def bj(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=BJ).astimezone(UTC)


def t(n: int) -> str:
    return task_id(ISSUE, n)


def rules_with(extra_yaml: str = "", escalate_on: str | None = None) -> RouterRules:
    """The contract rules with a tweak (a different ``escalate.on``, an ``urgency`` section)."""
    text = CONTRACT_RULES_TEXT
    if escalate_on is not None:
        text = text.replace("on: [acknowledge_breach, resolve_breach, return]", f"on: [{escalate_on}]")
    return RouterRules(org=CONTRACT.org, rulebook=parse_rulebook(text + extra_yaml, "<test rules>"),
                       clocks=CONTRACT.clocks)


@dataclass
class Story:
    """One issue's stream: events appended at increasing stream sequences, the state folded from them."""

    rules: RouterRules
    log: list[tuple[ev.Event, int]] = field(default_factory=list)

    @property
    def state(self) -> IssueState:
        return fold(ISSUE, self.log)

    @property
    def events(self) -> list[ev.Event]:
        return [e for e, _ in self.log]

    @property
    def last(self) -> tuple[ev.Event, int]:
        return self.log[-1]

    def record(self, events: list[ev.Event], gap: int = 3) -> None:
        seq = self.log[-1][1] if self.log else 0
        for e in events:
            seq += gap  # other issues' events sit in between on the stream
            self.log.append((e, seq))

    def act(self, command: cmd.Command, now: datetime) -> tuple[ev.Event, int]:
        """An actor's command through the decider; returns the last recorded event and its seq (the cue)."""
        self.record(decide(self.state, command, now))
        return self.last

    def react(self, now: datetime, cue: tuple[ev.Event, int] | None = None) -> list[ev.Event]:
        """The router answers ``cue`` (default: the last event) and its answer is recorded."""
        event, seq = cue or self.last
        out = react(self.state, event, seq, self.rules, now)
        self.record(out)
        return out

    def timer(self, task: str, now: datetime) -> list[ev.Event]:
        out = on_timer(self.state, task, self.rules, now)
        self.record(out)
        return out


def reported(rules: RouterRules = CONTRACT, category: str = "road_damage", grid: str = "wuxing-g1",
             now: datetime = T0, **kw: object) -> Story:
    story = Story(rules)
    story.act(cmd.ReportIssue(grid=grid, category=category, title="t", reporter="gw", **kw), now)  # type: ignore[arg-type]
    return story


def dispatched(rules: RouterRules = CONTRACT, category: str = "road_damage", grid: str = "wuxing-g1",
               now: datetime = T0, **kw: object) -> Story:
    story = reported(rules, category, grid, now, **kw)
    story.react(now)
    return story


def of(events: list[ev.Event], kind: type[ev.Event]) -> list[ev.Event]:
    return [e for e in events if isinstance(e, kind)]


def tasks(events: list[ev.Event]) -> list[tuple[str, str, str]]:
    """(task id, department, role) of every dispatch."""
    return [(e.task_id, e.department, e.role) for e in of(events, ev.TaskDispatched)]  # type: ignore[attr-defined]


def kinds(events: list[ev.Event]) -> list[str]:
    return [e.name for e in events]


# -- a new report ---------------------------------------------------------------------------------------------
def test_road_damage_report_is_routed_to_district_transport_with_police_and_natural_clocks() -> None:
    # given a road damage report in grid wuxing-g1 at T0 (stored at seq 3)
    story = reported()
    event, seq = story.last
    # when the router answers it
    out = react(story.state, event, seq, CONTRACT, T0)
    # then the district owns it, transport leads and the police co-handle
    routed = out[0]
    assert isinstance(routed, ev.IssueRouted)
    assert (routed.level, routed.owner_area, routed.reason) == ("district", "dinghai", "reported")
    assert routed.caused_by == seq
    assert routed.rulebook_version == CONTRACT.rulebook.version
    assert routed.rule.startswith(f"rulebook {CONTRACT.rulebook.version} categories.road_damage.handlers.district")
    assert kinds(out) == ["issue_routed", "task_dispatched", "task_dispatched"]
    assert tasks(out) == [(t(1), "dinghai-roads", "lead"), (t(2), "dinghai-police", "co")]
    # and both tasks run on the natural clock: acknowledge in 30 min, resolve in 24 h, warnings at 0.8
    for d in of(out, ev.TaskDispatched):
        assert isinstance(d, ev.TaskDispatched)
        assert (d.level, d.clock, d.dispatched_at, d.caused_by) == ("district", "natural", T0, seq)
        assert (d.acknowledge_due, d.resolve_due) == (T0 + 30 * MIN, T0 + 24 * HOUR)
        assert (d.acknowledge_warn, d.resolve_warn) == (T0 + 24 * MIN, T0 + 19 * HOUR + 12 * MIN)


def test_a_cue_already_handled_is_answered_with_nothing() -> None:
    # given the router already answered the report (its events carry caused_by = the report's seq)
    story = reported()
    cue = story.last
    story.react(T0)
    assert cue[1] in story.state.handled
    # when the same report is delivered again, then nothing more happens
    assert react(story.state, *cue, CONTRACT, T0 + MIN) == []


def test_a_closed_issue_gets_no_reaction() -> None:
    # given a report resolved on site before the router saw it
    story = reported()
    cue = story.last
    story.act(cmd.ResolveOnSite(by="gw"), T0 + MIN)
    assert story.state.status == "closed"
    # when the router sees the report, then it dispatches nothing
    assert react(story.state, *cue, CONTRACT, T0 + 2 * MIN) == []


def test_a_report_handled_on_the_spot_is_never_dispatched_even_folded_alone() -> None:
    # given a report recorded as handled on the spot (即报即处): reported, resolved on site, closed, one append
    story = reported(resolved_on_site=True)
    report = next((e, seq) for e, seq in story.log if isinstance(e, ev.IssueReported))
    assert story.state.status == "closed"
    # when the router's fast path folds only the report (it does not load what followed), then nothing
    alone = evolve(initial_state(story.state.id), report[0], report[1])
    assert alone.status == "reported" and react(alone, *report, CONTRACT, T0) == []
    assert react(story.state, *report, CONTRACT, T0) == []


def test_a_report_already_dispatched_under_another_cue_is_not_dispatched_twice() -> None:
    story = dispatched()
    event, _ = story.log[0]
    assert react(story.state, event, 10_000, CONTRACT, T0) == []


def test_a_violence_flag_lifts_a_neighbour_dispute_to_the_district() -> None:
    # given a neighbour dispute (starts at the community) reported with the risk flag violence
    story = reported(category="neighbour_dispute", grid="wuxing-g2", risk=("violence",))
    # when the router answers it
    out = story.react(T0)
    # then the district owns it at once, with reason "risk"; no district handler, so its command centre leads
    routed = out[0]
    assert isinstance(routed, ev.IssueRouted)
    assert (routed.level, routed.owner_area, routed.reason) == ("district", "dinghai", "risk")
    assert tasks(out) == [(t(1), "dinghai-center", "lead")]
    # and the working clock starts: 2 working hours from Tuesday 10:00 is 12:00
    d = of(out, ev.TaskDispatched)[0]
    assert isinstance(d, ev.TaskDispatched)
    assert (d.clock, d.acknowledge_due) == ("working", bj(2025, 3, 4, 12, 0))


def test_an_unknown_risk_flag_routes_as_reported() -> None:
    out = reported(category="neighbour_dispute", risk=("aliens",)).react(T0)
    routed = out[0]
    assert isinstance(routed, ev.IssueRouted)
    assert (routed.level, routed.owner_area, routed.reason) == ("community", "wuxing", "reported")
    assert tasks(out) == [(t(1), "wuxing-committee", "lead")]


def test_a_risk_flag_lifts_the_urgency_used_for_the_sla() -> None:
    # given a rulebook where emergencies get a quarter of each clock, and violence means at least an emergency
    rules = rules_with("urgency:\n  emergency: {sla_factor: 0.25}\n")
    # when a normal-urgency road damage report flagged violence is dispatched
    d = of(dispatched(rules, risk=("violence",)).events, ev.TaskDispatched)[0]
    # then its clocks are those of an emergency (30 min / 4 = 7.5 min, 24 h / 4 = 6 h), as for urgency emergency
    explicit = of(dispatched(rules, urgency="emergency").events, ev.TaskDispatched)[0]
    assert isinstance(explicit, ev.TaskDispatched) and isinstance(d, ev.TaskDispatched)
    assert (explicit.acknowledge_due, explicit.resolve_due) == (T0 + 7.5 * MIN, T0 + 6 * HOUR)
    assert (d.acknowledge_due, d.resolve_due) == (T0 + 7.5 * MIN, T0 + 6 * HOUR)


def test_demo_collective_petition_lifts_slope_works_to_the_street_which_convenes_departments() -> None:
    # given story 1: slope works in grid 33 of 展茅, flagged as a collective petition risk, the day before National Day
    now = bj(2025, 9, 30, 16, 0)
    out = dispatched(DEMO, "construction_nuisance", "zhanmao-g33", now, risk=("collective_petition",)).events[1:]
    # then the street command centre leads and convenes urban management, ecology and housing
    routed = out[0]
    assert isinstance(routed, ev.IssueRouted)
    assert (routed.level, routed.owner_area, routed.reason) == ("street", "zhanmao", "risk")
    assert tasks(out) == [(t(1), "zhanmao-center", "lead"), (t(2), "zhanmao-enforcement", "co"),
                          (t(3), "zhanmao-ecology", "co"), (t(4), "zhanmao-housing", "co")]
    # and the working clocks skip the National Day holiday: 4 working hours -> 9 October 11:00, 2 days -> 10 October
    d = of(out, ev.TaskDispatched)[0]
    assert isinstance(d, ev.TaskDispatched)
    assert (d.clock, d.acknowledge_due, d.resolve_due) == ("working", bj(2025, 10, 9, 11, 0), bj(2025, 10, 10, 16, 0))


def test_demo_sea_safety_on_qingming_goes_to_the_district_on_the_natural_clock() -> None:
    # given story 2: sea safety on 蚂蚁岛 on Qingming 2009 (a public holiday)
    now = bj(2009, 4, 4, 9, 0)
    out = dispatched(DEMO, "sea_safety", "mayidao-g1", now).events[1:]
    # then the district ocean & fisheries bureau leads, due within the hour despite the holiday
    routed = out[0]
    assert isinstance(routed, ev.IssueRouted) and (routed.level, routed.owner_area) == ("district", "putuo")
    lead = of(out, ev.TaskDispatched)[0]
    assert isinstance(lead, ev.TaskDispatched)
    assert (lead.department, lead.role, lead.clock) == ("putuo-ocean", "lead", "natural")
    assert (lead.acknowledge_due, lead.resolve_due) == (now + 15 * MIN, now + HOUR)


# -- returns (退单) -----------------------------------------------------------------------------------------------
def test_a_lead_return_escalates_when_return_is_an_escalation_trigger() -> None:
    # given a dispatched road damage whose lead returns the task
    story = dispatched()
    cue = story.act(cmd.ReturnTask(t(1), by="roads", reason="not a road"), T0 + 10 * MIN)
    # when the router answers the return
    out = story.react(T0 + 11 * MIN)
    # then the issue goes one level up (the city), the open co task is superseded and the city takes it over
    assert out[0] == ev.IssueEscalated(from_level="district", to_level="city", cause="return", reason="not a road",
                                       caused_by=cue[1])
    routed = out[1]
    assert isinstance(routed, ev.IssueRouted)
    assert (routed.level, routed.owner_area, routed.reason, routed.caused_by) == ("city", "city", "escalated", cue[1])
    assert of(out, ev.TaskSuperseded) == [ev.TaskSuperseded(task_id=t(2), reason="escalated to city",
                                                            caused_by=cue[1])]
    # and the city's command centre leads (no city handler); it is not added again as a co-handler
    assert tasks(out) == [(t(3), "city-center", "lead")]
    after = story.state
    assert (after.level, after.escalations, [x.id for x in after.open_tasks]) == ("city", 1, [t(3)])
    assert after.task(t(1)).status == "returned"


def test_an_escalation_adds_the_upper_command_centre_as_co_handler_when_it_does_not_lead() -> None:
    # given demo noise in wuxing-g1: the community committee leads
    story = dispatched(DEMO, "noise")
    assert tasks(story.events[1:]) == [(t(1), "wuxing-committee", "lead")]
    # when the committee returns the task
    story.act(cmd.ReturnTask(t(1), by="committee", reason="commercial noise"), T0 + HOUR)
    out = story.react(T0 + HOUR)
    # then the street takes it: police lead, urban management co, and the street command centre supervises (督办)
    assert of(out, ev.IssueEscalated)[0].to_level == "street"  # type: ignore[attr-defined]
    assert tasks(out) == [(t(2), "huannan-police", "lead"), (t(3), "huannan-enforcement", "co"),
                          (t(4), "huannan-center", "co")]


def test_a_lead_return_goes_to_the_owner_command_centre_when_return_does_not_escalate() -> None:
    # given rules where a return is not an escalation trigger
    story = dispatched(rules_with(escalate_on="acknowledge_breach, resolve_breach"))
    cue = story.act(cmd.ReturnTask(t(1), by="roads", reason="not a road"), T0 + 10 * MIN)
    # when the router answers the return
    out = story.react(T0 + 11 * MIN)
    # then the district's command centre takes the lead at the same level (兜底)
    routed = out[0]
    assert isinstance(routed, ev.IssueRouted)
    assert (routed.level, routed.owner_area, routed.reason, routed.caused_by) == (
        "district", "dinghai", "returned", cue[1])
    assert "兜底" in routed.rule
    assert tasks(out) == [(t(3), "dinghai-center", "lead")]
    assert not of(out, ev.IssueEscalated)


def test_a_co_handler_return_only_closes_its_own_task() -> None:
    story = dispatched()
    story.act(cmd.ReturnTask(t(2), by="police", reason="not ours"), T0 + 10 * MIN)
    assert story.react(T0 + 11 * MIN) == []
    assert [x.id for x in story.state.open_tasks] == [t(1)]


def test_a_return_at_the_city_by_the_command_centre_leaves_it_for_supervisors() -> None:
    # given the issue escalated to the city, where the city command centre leads
    story = dispatched()
    story.act(cmd.ReturnTask(t(1), by="roads", reason="x"), T0 + MIN)
    story.react(T0 + MIN)
    # when the city command centre returns it too, then nobody is left to take it: no reaction
    story.act(cmd.ReturnTask(t(3), by="city", reason="y"), T0 + 2 * MIN)
    assert story.react(T0 + 2 * MIN) == []


# -- escalation on request ------------------------------------------------------------------------------------
def test_a_requested_escalation_is_routed_to_the_requested_level() -> None:
    # given demo road damage owned by the street (urban management leads)
    story = dispatched(DEMO)
    assert tasks(story.events[1:]) == [(t(1), "huannan-enforcement", "lead")]
    # when the grid worker asks for the district (逐级反映)
    cue = story.act(cmd.EscalateIssue(by="gw", reason="逐级反映", to_level="district"), T0 + HOUR)
    out = story.react(T0 + HOUR)
    # then the district takes it: transport leads, police co-handles, the district command centre supervises
    routed = out[0]
    assert isinstance(routed, ev.IssueRouted)
    assert (routed.level, routed.owner_area, routed.reason, routed.caused_by) == (
        "district", "dinghai", "escalated", cue[1])
    assert of(out, ev.TaskSuperseded) == [ev.TaskSuperseded(task_id=t(1), reason="escalated to district",
                                                            caused_by=cue[1])]
    assert tasks(out) == [(t(2), "dinghai-transport", "lead"), (t(3), "dinghai-police", "co"),
                          (t(4), "dinghai-center", "co")]
    assert story.state.level == "district"


def test_the_routers_own_escalation_event_is_not_a_request() -> None:
    # given the router escalated the issue itself (a lead return)
    story = dispatched()
    story.act(cmd.ReturnTask(t(1), by="roads", reason="x"), T0 + MIN)
    story.react(T0 + MIN)
    escalated = next((e, s) for e, s in story.log if isinstance(e, ev.IssueEscalated))
    # when its own IssueEscalated comes back on the stream, then it does nothing more
    assert react(story.state, *escalated, CONTRACT, T0 + 2 * MIN) == []


# -- reopen (返工) --------------------------------------------------------------------------------------------
def resolved(story: Story, lead: str, now: datetime) -> None:
    story.act(cmd.AcknowledgeTask(lead, by="lead"), now)
    story.act(cmd.ResolveTask(lead, by="lead"), now + MIN)


def test_a_first_failed_verification_redispatches_the_same_level() -> None:
    # given a resolved road damage whose verification fails
    story = dispatched()
    resolved(story, t(1), T0 + HOUR)
    cue = story.act(cmd.VerifyIssue(passed=False, by="gw", note="still a hole"), T0 + 2 * HOUR)
    # when the router answers the reopen
    out = story.react(T0 + 2 * HOUR)
    # then the same district departments get fresh tasks with fresh clocks (the old ones were superseded on reopen)
    routed = out[0]
    assert isinstance(routed, ev.IssueRouted)
    assert (routed.level, routed.owner_area, routed.reason, routed.caused_by) == (
        "district", "dinghai", "reopened", cue[1])
    assert not of(out, ev.TaskSuperseded) and not of(out, ev.IssueEscalated)
    assert tasks(out) == [(t(3), "dinghai-roads", "lead"), (t(4), "dinghai-police", "co")]
    assert of(out, ev.TaskDispatched)[0].acknowledge_due == T0 + 2 * HOUR + 30 * MIN  # type: ignore[attr-defined]
    assert story.state.status == "dispatched"


def twice_reopened(rules: RouterRules) -> Story:
    story = dispatched(rules)
    resolved(story, t(1), T0 + HOUR)
    story.act(cmd.VerifyIssue(passed=False, by="gw"), T0 + 2 * HOUR)
    story.react(T0 + 2 * HOUR)
    lead = story.state.lead
    assert lead is not None
    resolved(story, lead.id, T0 + 3 * HOUR)
    story.act(cmd.VerifyIssue(passed=False, by="gw"), T0 + 4 * HOUR)
    assert (story.state.status, story.state.failed_verifications) == ("reopened", 2)
    return story


def test_a_second_failed_verification_escalates_with_verification_failed_twice() -> None:
    # given demo road damage (street) reopened for the second time
    story = twice_reopened(DEMO)
    cue = story.last
    # when the router answers
    out = story.react(T0 + 4 * HOUR)
    # then the issue goes up to the district
    assert out[0] == ev.IssueEscalated(from_level="street", to_level="district", cause="verification_failed_twice",
                                       caused_by=cue[1])
    assert tasks(out)[0][1:] == ("dinghai-transport", "lead")
    assert story.state.level == "district"


def test_a_second_failed_verification_redispatches_when_it_is_not_an_escalation_trigger() -> None:
    # given the contract rules (escalate.on lacks verification_failed_twice)
    story = twice_reopened(CONTRACT)
    out = story.react(T0 + 4 * HOUR)
    assert not of(out, ev.IssueEscalated)
    assert out[0].reason == "reopened" and out[0].level == "district"  # type: ignore[attr-defined]


# -- SLA timers -----------------------------------------------------------------------------------------------
def test_next_edge_orders_ack_warn_ack_due_resolve_warn_resolve_due() -> None:
    # given a dispatched lead task
    story = dispatched()
    lead = story.state.task(t(1))
    # then its clock edges come in order
    assert pending_edges(lead) == [
        (T0 + 24 * MIN, TimerEdge(t(1), "acknowledge", "warn")),
        (T0 + 30 * MIN, TimerEdge(t(1), "acknowledge", "due")),
        (T0 + 19 * HOUR + 12 * MIN, TimerEdge(t(1), "resolve", "warn")),
        (T0 + 24 * HOUR, TimerEdge(t(1), "resolve", "due")),
    ]
    assert next_edge(lead) == (T0 + 24 * MIN, TimerEdge(t(1), "acknowledge", "warn"))
    # and once acknowledged the acknowledge edges are gone
    story.act(cmd.AcknowledgeTask(t(1), by="roads"), T0 + MIN)
    acked = story.state.task(t(1))
    assert [e.clock for _, e in pending_edges(acked)] == ["resolve", "resolve"]
    assert next_edge(acked) == (T0 + 19 * HOUR + 12 * MIN, TimerEdge(t(1), "resolve", "warn"))
    # and a resolved task has no edge left
    story.act(cmd.ResolveTask(t(1), by="roads"), T0 + 2 * MIN)
    assert next_edge(story.state.task(t(1))) is None


def test_a_warning_and_a_due_at_the_same_instant_fire_warning_first() -> None:
    # given an acknowledged task whose resolve warning was moved onto its due time
    story = dispatched()
    story.act(cmd.AcknowledgeTask(t(1), by="roads"), T0 + MIN)
    story.act(cmd.RequestExtension(t(1), by="roads", extension=HOUR, reason="r"), T0 + MIN)
    story.act(cmd.ApproveExtension(t(1), by="sup", resolve_due=T0 + 25 * HOUR, resolve_warn=T0 + 25 * HOUR), T0 + MIN)
    edges = [e.edge for _, e in pending_edges(story.state.task(t(1)))]
    assert edges == ["warn", "due"]


def test_a_timer_firing_before_the_warning_does_nothing() -> None:
    story = dispatched()
    assert on_timer(story.state, t(1), CONTRACT, T0 + 24 * MIN - MS) == []


def test_the_acknowledge_warning_fires_once() -> None:
    # given a dispatched lead at its acknowledge warning time
    story = dispatched()
    warn = T0 + 24 * MIN
    # when the timer fires
    assert story.timer(t(1), warn) == [ev.SlaWarned(task_id=t(1), clock="acknowledge", due=T0 + 30 * MIN)]
    # then once the warning is folded in, a redelivered or later timer warns no more
    assert on_timer(story.state, t(1), CONTRACT, warn) == []
    assert on_timer(story.state, t(1), CONTRACT, warn + 5 * MIN) == []
    assert next_edge(story.state.task(t(1))) == (T0 + 30 * MIN, TimerEdge(t(1), "acknowledge", "due"))


def test_an_unacknowledged_lead_at_its_due_breaches_and_escalates() -> None:
    # given a dispatched lead already warned, still not acknowledged
    story = dispatched()
    story.timer(t(1), T0 + 24 * MIN)
    # when its acknowledge deadline passes
    out = story.timer(t(1), T0 + 30 * MIN)
    # then the breaches are recorded (the co-handler's clock ran out too) and the issue escalates to the
    # city, superseding both district tasks
    assert out[0] == ev.SlaBreached(task_id=t(1), clock="acknowledge", due=T0 + 30 * MIN)
    assert out[1] == ev.SlaBreached(task_id=t(2), clock="acknowledge", due=T0 + 30 * MIN)
    assert out[2] == ev.IssueEscalated(from_level="district", to_level="city", cause="acknowledge_breach")
    assert [e.task_id for e in of(out, ev.TaskSuperseded)] == [t(1), t(2)]  # type: ignore[attr-defined]
    assert tasks(out) == [(t(3), "city-center", "lead")]
    assert story.state.level == "city" and story.state.task(t(1)).breached == {"acknowledge"}


def test_a_late_timer_fires_every_edge_already_past_in_order() -> None:
    story = dispatched()
    out = on_timer(story.state, t(1), CONTRACT, T0 + 2 * HOUR)
    assert kinds(out)[:4] == ["sla_warned", "sla_breached", "sla_breached", "issue_escalated"]


def test_a_co_handler_breach_is_recorded_without_escalation() -> None:
    story = dispatched()
    out = on_timer(story.state, t(2), CONTRACT, T0 + 30 * MIN)
    assert out == [ev.SlaWarned(task_id=t(2), clock="acknowledge", due=T0 + 30 * MIN),
                   ev.SlaBreached(task_id=t(2), clock="acknowledge", due=T0 + 30 * MIN)]


def test_ack_one_ms_before_deadline_does_not_escalate() -> None:
    # given a lead acknowledged one millisecond before its acknowledge deadline
    story = dispatched()
    due = T0 + 30 * MIN
    story.act(cmd.AcknowledgeTask(t(1), by="roads"), due - MS)
    # when the timer scheduled for the deadline fires at it, or a little after
    for now in (due, due + MS, due + 2 * MIN):
        # then there is no breach and no escalation
        assert on_timer(story.state, t(1), CONTRACT, now) == []
    assert story.state.level == "district"


def test_a_resolve_breach_of_the_lead_escalates() -> None:
    story = dispatched()
    story.act(cmd.AcknowledgeTask(t(1), by="roads"), T0 + MIN)
    out = story.timer(t(1), T0 + 24 * HOUR)
    # the unacknowledged co-handler's clocks ran out too: recorded before the escalation supersedes it
    assert kinds(out)[:2] == ["sla_warned", "sla_breached"]
    assert kinds(out)[-len(kinds(out)) + kinds(out).index("issue_escalated"):][0] == "issue_escalated"
    assert {(e.task_id, e.clock) for e in of(out, ev.SlaBreached)} >= {(t(1), "resolve"), (t(2), "acknowledge")}  # type: ignore[attr-defined]
    assert of(out, ev.IssueEscalated)[0].cause == "resolve_breach"  # type: ignore[attr-defined]


def test_a_breach_that_is_not_an_escalation_trigger_is_only_recorded() -> None:
    story = dispatched(rules_with(escalate_on="return"))
    out = on_timer(story.state, t(1), story.rules, T0 + 30 * MIN)
    assert kinds(out) == ["sla_warned", "sla_breached"]


def test_a_breach_at_the_city_is_only_recorded() -> None:
    # given the issue already escalated to the city by a breach
    story = dispatched()
    story.timer(t(1), T0 + 30 * MIN)
    city_lead = story.state.task(t(3))
    assert (story.state.level, city_lead.department) == ("city", "city-center")
    # when the city lead breaches its acknowledge clock too
    out = story.timer(t(3), city_lead.acknowledge_due)
    # then the breach is recorded and nothing escalates past the city
    assert out == [ev.SlaWarned(task_id=t(3), clock="acknowledge", due=city_lead.acknowledge_due),
                   ev.SlaBreached(task_id=t(3), clock="acknowledge", due=city_lead.acknowledge_due)]
    assert story.state.level == "city" and story.state.escalations == 1


def test_an_approved_extension_moves_the_resolve_due_so_the_old_due_does_nothing() -> None:
    # given an acknowledged lead whose resolve clock was extended by a day
    story = dispatched()
    story.act(cmd.AcknowledgeTask(t(1), by="roads"), T0 + MIN)
    story.act(cmd.RequestExtension(t(1), by="roads", extension=24 * HOUR, reason="asphalt"), T0 + HOUR)
    due, warn = CONTRACT.clocks.extend(CONTRACT.rulebook, story.state.task(t(1)), 24 * HOUR)
    assert (due, warn) == (T0 + 48 * HOUR, T0 + 38 * HOUR + 24 * MIN)
    story.act(cmd.ApproveExtension(t(1), by="sup", resolve_due=due, resolve_warn=warn), T0 + 2 * HOUR)
    # when the timer set for the old due fires, then nothing happens
    assert on_timer(story.state, t(1), CONTRACT, T0 + 24 * HOUR) == []
    # and the new edges fire at their new times
    assert on_timer(story.state, t(1), CONTRACT, warn) == [ev.SlaWarned(task_id=t(1), clock="resolve", due=due)]


# -- one timer per dispatch, handled per issue -------------------------------------------------------------------
def test_a_dispatch_has_one_timer_for_the_earliest_edge_over_its_open_tasks() -> None:
    # given lead and co-task of one dispatch (same deadlines): one timer, keyed by the lead
    story = dispatched()
    assert latest_dispatch_timer(story.state) == dispatch_timer(story.state, t(2)) == (t(1), T0 + 24 * MIN)
    # when the lead acknowledges, the co-task's acknowledge warning is still the next edge
    story.act(cmd.AcknowledgeTask(t(1), by="roads"), T0 + MIN)
    assert latest_dispatch_timer(story.state) == (t(1), T0 + 24 * MIN)
    # when both acknowledged, the next edge is the resolve warning
    story.act(cmd.AcknowledgeTask(t(2), by="police"), T0 + 2 * MIN)
    assert latest_dispatch_timer(story.state) == (t(1), T0 + 19 * HOUR + 12 * MIN)
    # and an issue with no clock running has no timer
    story.act(cmd.ResolveTask(t(1), by="roads"), T0 + 3 * MIN)
    story.act(cmd.VerifyIssue(passed=True, by="gw"), T0 + 5 * MIN)
    assert latest_dispatch_timer(story.state) is None
    assert latest_dispatch_timer(reported().state) is None
    assert dispatch_timer(dispatched().state, "garbage") is None


def test_a_superseded_dispatch_has_no_timer_left_and_never_replaces_the_new_ones() -> None:
    # given the district dispatch escalated to the city by a breach
    story = dispatched()
    story.timer(t(1), T0 + 30 * MIN)
    city = story.state.task(t(3))
    # then the district dispatch's timer is done, and the city's runs under its own key
    assert dispatch_timer(story.state, t(1)) is None and dispatch_timer(story.state, t(2)) is None
    assert latest_dispatch_timer(story.state) == (t(3), city.acknowledge_warn)


def test_the_issue_timer_warns_every_open_task_at_once_and_only_once() -> None:
    story = dispatched()
    warn = T0 + 24 * MIN
    assert on_issue_timer(story.state, CONTRACT, warn - MS) == []
    out = on_issue_timer(story.state, CONTRACT, warn)
    assert out == [ev.SlaWarned(task_id=t(1), clock="acknowledge", due=T0 + 30 * MIN),
                   ev.SlaWarned(task_id=t(2), clock="acknowledge", due=T0 + 30 * MIN)]
    story.record(out)
    assert on_issue_timer(story.state, CONTRACT, warn + MIN) == []  # a redelivered timer adds nothing
    assert latest_dispatch_timer(story.state) == (t(1), T0 + 30 * MIN)


def test_a_late_issue_timer_records_every_past_edge_in_time_order_then_escalates() -> None:
    # given nobody watched the clocks until long after the acknowledge deadline
    story = dispatched()
    out = on_issue_timer(story.state, CONTRACT, T0 + 2 * HOUR)
    # then both warnings, then both breaches (the lead's first), then the escalation superseding both tasks
    assert [(type(e).__name__, getattr(e, "task_id", None)) for e in out[:5]] == [
        ("SlaWarned", t(1)), ("SlaWarned", t(2)), ("SlaBreached", t(1)), ("SlaBreached", t(2)),
        ("IssueEscalated", None)]
    assert [e.task_id for e in of(out, ev.TaskSuperseded)] == [t(1), t(2)]  # type: ignore[attr-defined]
    assert tasks(out) == [(t(3), "city-center", "lead")]
    story.record(out)
    # and the city lead's clock is the issue's timer now
    assert latest_dispatch_timer(story.state) == (t(3), story.state.task(t(3)).acknowledge_warn)


def test_the_issue_timer_breaches_the_co_task_whatever_the_lead_did() -> None:
    # given the lead acknowledged in time and the co-handler did not
    story = dispatched()
    story.act(cmd.AcknowledgeTask(t(1), by="roads"), T0 + 30 * MIN - MS)
    out = on_issue_timer(story.state, CONTRACT, T0 + 30 * MIN)
    # then the co-task is warned and breached, the lead nothing, and nothing escalates
    assert out == [ev.SlaWarned(task_id=t(2), clock="acknowledge", due=T0 + 30 * MIN),
                   ev.SlaBreached(task_id=t(2), clock="acknowledge", due=T0 + 30 * MIN)]


def test_an_issue_acknowledged_one_ms_before_its_deadline_is_never_escalated_by_its_timer() -> None:
    story = dispatched()
    story.timer(t(1), T0 + 24 * MIN)
    story.timer(t(2), T0 + 24 * MIN)
    due = T0 + 30 * MIN
    story.act(cmd.AcknowledgeTask(t(1), by="roads"), due - MS)
    story.act(cmd.AcknowledgeTask(t(2), by="police"), due - MS)
    for now in (due, due + MS, due + 2 * MIN):
        assert on_issue_timer(story.state, CONTRACT, now) == []
    assert latest_dispatch_timer(story.state) == (t(1), T0 + 19 * HOUR + 12 * MIN)


@pytest.mark.parametrize("task", [t(9), "garbage"])
def test_a_timer_for_an_unknown_task_does_nothing(task: str) -> None:
    assert on_timer(dispatched().state, task, CONTRACT, T0 + 30 * MIN) == []


def test_a_timer_on_a_closed_issue_does_nothing() -> None:
    story = dispatched()
    resolved(story, t(1), T0 + MIN)
    story.act(cmd.VerifyIssue(passed=True, by="gw"), T0 + 5 * MIN)
    assert on_timer(story.state, t(2), CONTRACT, T0 + 30 * HOUR) == []


def test_a_superseded_or_returned_task_has_no_clock_left() -> None:
    story = dispatched()
    story.act(cmd.ReturnTask(t(1), by="roads", reason="x"), T0 + MIN)
    story.react(T0 + MIN)
    state = story.state
    assert (state.task(t(1)).status, state.task(t(2)).status) == ("returned", "superseded")
    assert next_edge(state.task(t(1))) is None and next_edge(state.task(t(2))) is None
    assert on_timer(state, t(1), CONTRACT, T0 + 30 * MIN) == []


def test_a_stale_requested_escalation_never_moves_the_issue_down() -> None:
    # given demo road damage at the street, and a grid worker's request for the district (not answered yet)
    story = dispatched(DEMO)
    request = story.act(cmd.EscalateIssue(by="gw", reason="逐级反映", to_level="district"), T0 + MIN)
    # and meanwhile two acknowledge breaches took the issue to the district, then to the city
    story.timer(t(1), story.state.task(t(1)).acknowledge_due)
    lead = story.state.lead
    assert lead is not None and story.state.level == "district"
    story.timer(lead.id, lead.acknowledge_due)
    assert story.state.level == "city"
    # when the router finally answers the request, then the issue stays at the city
    assert react(story.state, *request, DEMO, T0 + 2 * HOUR) == []


def test_a_missing_progress_report_warns_once_per_period_and_a_report_restarts_it() -> None:
    # given the rulebook requires progress every 2 hours (top level: every category)
    rules = rules_with("progress_every: PT2H\n")
    story = dispatched(rules)
    lead = story.state.task(t(1))
    assert (T0 + 2 * HOUR, TimerEdge(t(1), "progress", "warn")) in pending_edges(lead, 2 * HOUR)
    assert dispatch_timer(story.state, t(1), 2 * HOUR) == (t(1), T0 + 24 * MIN)  # earlier edges first
    story.act(cmd.AcknowledgeTask(t(1), by="roads"), T0 + MIN)
    # then a period without a report warns once, at its end, and a redelivered timer adds nothing
    assert story.timer(t(1), T0 + 2 * HOUR - MS) == []
    assert story.timer(t(1), T0 + 2 * HOUR) == [ev.ProgressMissed(task_id=t(1), due=T0 + 2 * HOUR)]
    assert story.timer(t(1), T0 + 2 * HOUR + MIN) == []
    # and a progress report restarts the period from the report
    story.act(cmd.AddComment(by="h", role="handler", text="half", kind="progress", department="dinghai-roads"),
              T0 + 3 * HOUR)
    assert story.timer(t(1), T0 + 4 * HOUR) == []
    assert story.timer(t(1), T0 + 5 * HOUR) == [ev.ProgressMissed(task_id=t(1), due=T0 + 5 * HOUR)]
    # and a held task (an info request) or a category without the rule has no such edge
    held = evolve(story.state, ev.ClocksPaused(task_id=t(1), at=T0 + 6 * HOUR))
    assert pending_edges(held.task(t(1)), 2 * HOUR) == []
    assert all(e.clock != "progress" for _, e in pending_edges(dispatched().state.task(t(1))))
