"""The small pure pieces at the edges of the core: the CloudEvents codec (shared/events/codec.py), the subject
taxonomy (shared/events/subjects.py), identifiers (shared/domain/ids.py) and bearer tokens (shared/auth.py)."""
from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import jwt
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared import auth
from shared.domain import ids
from shared.domain.errors import Invalid
from shared.events import codec, subjects
from shared.events import models as ev

T0 = datetime(2025, 3, 4, 2, 0, 0, 123456, tzinfo=UTC)
ISSUE = ids.new_issue_id(int(T0.timestamp() * 1000), 7)
TASK = ids.task_id(ISSUE, 1)

SAMPLES: dict[type[ev.Event], ev.Event] = {
    ev.IssueReported: ev.IssueReported(
        grid="wuxing-g1", category="road_damage", title="路面塌陷", description="井盖缺失", urgency="urgent",
        risk=("violence", "collective_petition"), location=ev.Location(lat=30.002, lon=122.1028, address="五星路"),
        reporter="grid_worker:area:wuxing-g1", reported_at=T0, request_hash="ab" * 32, campaign="c1",
        resident=ev.ResidentRef(id="res_0123456789abcdef01234567", key_id="0a1b2c3d4e5f6071",
                                ciphertext="c2VhbGVk", nonce="AAAAAAAAAAAAAAAA")),
    ev.IssueResolvedOnSite: ev.IssueResolvedOnSite(by="gw", note="扶正了",
                                                   media=(ev.MediaRef(id="a" * 64, phase="after"),)),
    ev.IssueAccepted: ev.IssueAccepted(by="handler:dept:huannan-center", reason="属实"),
    ev.IssueRejected: ev.IssueRejected(by="handler:dept:huannan-center", reason="不属于政府职责"),
    ev.IssueVoided: ev.IssueVoided(by="sup", reason="测试数据"),
    ev.IssueRecategorised: ev.IssueRecategorised(by="sup", reason="实为井盖缺失", from_category="road_damage",
                                                 to_category="neighbour_dispute", from_grid="wuxing-g1",
                                                 to_grid="wuxing-g2"),
    ev.IssueRouted: ev.IssueRouted(level="district", owner_area="dinghai", reason="risk", rule="rulebook x: ...",
                                   rulebook_version="1a2b3c4d5e6f", caused_by=3),
    ev.TaskDispatched: ev.TaskDispatched(
        task_id=TASK, department="dinghai-roads", role="lead", level="district", clock="working", dispatched_at=T0,
        acknowledge_due=T0 + timedelta(hours=2), resolve_due=T0 + timedelta(days=5),
        acknowledge_warn=T0 + timedelta(minutes=96), resolve_warn=T0 + timedelta(days=4), caused_by=3),
    ev.TaskAcknowledged: ev.TaskAcknowledged(task_id=TASK, by="roads", at=T0),
    ev.TaskReturned: ev.TaskReturned(task_id=TASK, by="roads", reason="不是道路", at=T0),
    ev.TaskResolved: ev.TaskResolved(task_id=TASK, by="roads", note=None, at=T0),
    ev.TaskSuperseded: ev.TaskSuperseded(task_id=TASK, reason="escalated to city", caused_by=9),
    ev.SlaWarned: ev.SlaWarned(task_id=TASK, clock="acknowledge", due=T0, caused_by=0),
    ev.ReviewWarned: ev.ReviewWarned(due=T0),
    ev.IssueMerged: ev.IssueMerged(by="sup", into=ISSUE, reason="同一处"),
    ev.IssueDuplicateAttached: ev.IssueDuplicateAttached(duplicate=ISSUE, caused_by=4),
    ev.IssueClosedWithTarget: ev.IssueClosedWithTarget(into=ISSUE, on_time=True, closed_at=T0, caused_by=5),
    ev.ReviewBreached: ev.ReviewBreached(due=T0),
    ev.SlaBreached: ev.SlaBreached(task_id=TASK, clock="resolve", due=T0),
    ev.IssueEscalated: ev.IssueEscalated(from_level="street", to_level="district", cause="requested",
                                         reason="逐级反映", by="gw", caused_by=0),
    ev.ExtensionRequested: ev.ExtensionRequested(task_id=TASK, by="roads", extension=timedelta(days=1, hours=12),
                                                 reason="等沥青"),
    ev.ExtensionApproved: ev.ExtensionApproved(task_id=TASK, by="sup", resolve_due=T0 + timedelta(days=6),
                                               resolve_warn=T0 + timedelta(days=5)),
    ev.IssueVerified: ev.IssueVerified(passed=False, by="gw", note="still broken"),
    ev.IssueReopened: ev.IssueReopened(reason="still broken", reopen_count=2),
    ev.IssueClosed: ev.IssueClosed(reason="verified", on_time=False, closed_at=T0),
    ev.FeedbackRecorded: ev.FeedbackRecorded(satisfaction="basically_satisfied", by="gw"),
    ev.ResidentFeedbackRecorded: ev.ResidentFeedbackRecorded(solved=True, satisfaction="satisfied", comment="好",
                                                              at=T0),
    ev.IssueUrged: ev.IssueUrged(by="sup", note="快"),
    ev.RulebookPublished: ev.RulebookPublished(rulebook_version="1a2b3c4d5e6f", source="deploy/rules/x.yaml",
                                               text="warn_at: 0.8\ncategories:\n  a: {start: grid}\n",
                                               categories=("a", "road_damage"), by="admin"),
    ev.ResidentForgotten: ev.ResidentForgotten(resident_id="res_0123456789abcdef01234567",
                                               key_ids=("0a1b2c3d4e5f6071",), by="admin", at=T0),
    ev.VisitRecorded: ev.VisitRecorded(grid="wuxing-g1", household="ab" * 32, kind="campaign", campaign="c1",
                                       visited_at=T0, by="grid_worker:area:wuxing-g1", note="独居老人",
                                       issues=(ISSUE,), request_hash="cd" * 32),
    ev.ReturnRequested: ev.ReturnRequested(task_id=f"{ISSUE}-1", by="h", reason="不属本单位", at=T0),
    ev.ReturnRejected: ev.ReturnRejected(task_id=f"{ISSUE}-1", by="h:c", reason="属于"),
    ev.ReturnApproved: ev.ReturnApproved(task_id=f"{ISSUE}-1", by="h:c", to_department="d", to_task_id=f"{ISSUE}-3",
                                         at=T0),
    ev.TaskReassigned: ev.TaskReassigned(task_id=f"{ISSUE}-1", to_task_id=f"{ISSUE}-3", from_department="a",
                                         to_department="b", by="sup", reason="改派", clocks="continue"),
    ev.ExtensionRejected: ev.ExtensionRejected(task_id=f"{ISSUE}-1", by="sup", reason="不批"),
    ev.SuspensionRequested: ev.SuspensionRequested(task_id=f"{ISSUE}-1", by="h", reason="诉讼", until=T0),
    ev.SuspensionApproved: ev.SuspensionApproved(task_id=f"{ISSUE}-1", by="sup", until=T0, at=T0),
    ev.SuspensionRejected: ev.SuspensionRejected(task_id=f"{ISSUE}-1", by="sup", reason="不批"),
    ev.SuspensionReviewDue: ev.SuspensionReviewDue(task_id=f"{ISSUE}-1", until=T0, caused_by=3),
    ev.SupervisionOrdered: ev.SupervisionOrdered(task_id=f"{ISSUE}-1", by="sup", due=T0, reason="督办",
                                                 remind_every=timedelta(days=1), at=T0),
    ev.SupervisionReminded: ev.SupervisionReminded(task_id=f"{ISSUE}-1", due=T0, at=T0),
    ev.SupervisionClosed: ev.SupervisionClosed(task_id=f"{ISSUE}-1", due=T0, on_time=False, at=T0),
    ev.IssueTextShredded: ev.IssueTextShredded(by="needle/retention", reason="retention", key_id="3f9a0c1e5b7d2a46",
                                               closed_at=T0, at=T0),
    ev.CommentAdded: ev.CommentAdded(by="h", role="handler", department="d", kind="progress", text="进展", at=T0),
    ev.ClocksPaused: ev.ClocksPaused(task_id=f"{ISSUE}-1", at=T0),
    ev.ClocksResumed: ev.ClocksResumed(task_id=f"{ISSUE}-1", at=T0, acknowledge_due=T0, resolve_due=T0,
                                       acknowledge_warn=T0, resolve_warn=T0),
    ev.ProgressMissed: ev.ProgressMissed(task_id=f"{ISSUE}-1", due=T0, caused_by=4),
    ev.DescriptionPublicationChanged: ev.DescriptionPublicationChanged(public=False, by="sup", reason="含门牌号"),
    ev.TaskResumed: ev.TaskResumed(task_id=f"{ISSUE}-1", by="h", at=T0, acknowledge_due=T0, resolve_due=T0,
                                   acknowledge_warn=T0, resolve_warn=T0),
}


def envelope(data: ev.Event, **changes: object) -> codec.Envelope:
    fields: dict[str, object] = {"id": "evt-1", "source": "needle/intake", "subject": ISSUE, "time": T0,
                                 "data": data, "actor": "gw", "causationid": "req-9"}
    return codec.Envelope(**{**fields, **changes})  # type: ignore[arg-type]


# -- codec ----------------------------------------------------------------------------------------------------
def test_every_event_type_has_a_sample() -> None:
    # a new event type must come with a sample here, so that its round trip is tested
    assert set(SAMPLES) == set(ev.EVENT_TYPES)
    assert all(type(sample) is cls for cls, sample in SAMPLES.items())


@pytest.mark.parametrize("event_type", ev.EVENT_TYPES, ids=lambda t: t.name)
def test_every_event_type_survives_an_encode_decode_round_trip(event_type: type[ev.Event]) -> None:
    # given an envelope carrying a sample of the type
    env = envelope(SAMPLES[event_type])
    # when it is encoded and decoded (the stream assigns seq 42)
    back = codec.decode(codec.encode(env), seq=42)
    # then every attribute and the payload come back, and the seq is the stream's
    assert back == envelope(SAMPLES[event_type], seq=42)
    assert type(back.data) is event_type and back.type == event_type.ce_type


@pytest.mark.parametrize("event_type", ev.EVENT_TYPES, ids=lambda t: t.name)
def test_an_encoded_event_is_a_cloudevent_1_0(event_type: type[ev.Event]) -> None:
    ce = orjson.loads(codec.encode(envelope(SAMPLES[event_type], seq=5)))
    assert {"specversion", "id", "source", "type", "subject", "time", "data"} <= set(ce)
    assert (ce["specversion"], ce["id"], ce["source"], ce["subject"]) == ("1.0", "evt-1", "needle/intake", ISSUE)
    assert ce["type"] == event_type.ce_type and ce["type"].startswith("needle.") and ce["type"].endswith(".v1")
    assert ce["time"] == "2025-03-04T02:00:00.123456Z"
    assert ce["datacontenttype"] == "application/json"
    assert ce["dataschema"] == f"urn:needle:schema:{event_type.ce_type}"
    assert (ce["actor"], ce["causationid"]) == ("gw", "req-9")
    assert ce["data"] == SAMPLES[event_type].model_dump(mode="json")
    # the stream sequence is never stored inside the payload
    assert "sequence" not in ce


def test_the_cloudevent_view_carries_the_stream_sequence_once_stored() -> None:
    assert envelope(SAMPLES[ev.IssueUrged], seq=17).to_cloudevent()["sequence"] == 17
    assert "sequence" not in envelope(SAMPLES[ev.IssueUrged]).to_cloudevent()


def test_optional_extension_attributes_are_left_out_when_absent() -> None:
    ce = orjson.loads(codec.encode(envelope(SAMPLES[ev.IssueUrged], actor=None, causationid=None)))
    assert "actor" not in ce and "causationid" not in ce
    back = codec.decode(codec.encode(envelope(SAMPLES[ev.IssueUrged], actor=None, causationid=None)))
    assert (back.actor, back.causationid, back.seq) == (None, None, 0)


def test_a_time_in_another_zone_decodes_to_the_same_instant() -> None:
    local = T0.astimezone(timezone(timedelta(hours=8)))
    back = codec.decode(codec.encode(envelope(SAMPLES[ev.IssueUrged], time=local)))
    assert back.time == T0 and back.time.utcoffset() == timedelta(hours=8)


def test_decoding_an_unknown_event_type_raises_unknown_event_type() -> None:
    raw = orjson.dumps({"specversion": "1.0", "id": "x", "source": "needle/future",
                        "type": "needle.issue.teleported.v1", "subject": ISSUE, "time": "2025-03-04T02:00:00Z",
                        "data": {}})
    with pytest.raises(codec.UnknownEventType, match=r"needle\.issue\.teleported\.v1"):
        codec.decode(raw)
    assert issubclass(codec.UnknownEventType, ValueError)


def test_decoding_a_payload_with_an_unknown_field_is_refused() -> None:
    ce = orjson.loads(codec.encode(envelope(SAMPLES[ev.IssueUrged])))
    ce["data"]["mood"] = "grumpy"
    with pytest.raises(ValidationError):
        codec.decode(orjson.dumps(ce))


def test_an_upcaster_turns_an_old_type_into_the_current_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # given an upcaster from a v0 urge (field "who") to the current v1 (field "by")
    monkeypatch.setitem(codec.UPCASTERS, "needle.issue.urged.v0",
                        ("needle.issue.urged.v1", lambda d: {"by": d["who"], "note": d.get("note")}))
    raw = orjson.dumps({"specversion": "1.0", "id": "old", "source": "needle/intake", "type": "needle.issue.urged.v0",
                        "subject": ISSUE, "time": "2020-01-01T00:00:00Z", "data": {"who": "sup"}})
    # when an old event is read, then it is the current model
    back = codec.decode(raw, seq=1)
    assert back.data == ev.IssueUrged(by="sup") and back.type == "needle.issue.urged.v1"


# -- subjects -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("event_type", ev.EVENT_TYPES, ids=lambda t: t.name)
def test_an_issue_event_subject_parses_back_to_issue_and_type(event_type: type[ev.Event]) -> None:
    subject = subjects.issue_event(ISSUE, event_type.name)
    assert subject == f"needle.events.issue.{ISSUE}.{event_type.name}"
    assert subjects.parse_issue_subject(subject) == (ISSUE, event_type.name)
    assert subjects.valid_token(event_type.name)


def test_wildcard_subjects_cover_one_issue_or_one_type() -> None:
    assert subjects.issue_events(ISSUE) == f"needle.events.issue.{ISSUE}.*"
    assert subjects.issue_events("v1", "visit") == "needle.events.visit.v1.*"
    assert subjects.aggregate_event("v1", "visit_recorded") == subjects.visit_event("v1")
    assert subjects.aggregate_event(ISSUE, "issue_urged") == subjects.issue_event(ISSUE, "issue_urged")
    assert subjects.events_of_type("task_dispatched") == "needle.events.issue.*.task_dispatched"
    assert subjects.timer_schedule(TASK) == f"needle.timers.schedule.{TASK}"
    assert subjects.timer_fired(TASK) == f"needle.timers.fired.{TASK}"


@pytest.mark.parametrize("subject", [
    "", "needle", "needle.events.issue", f"needle.events.issue.{ISSUE}",
    f"needle.events.issue.{ISSUE}.issue_reported.extra", f"other.events.issue.{ISSUE}.issue_reported",
    f"needle.timers.issue.{ISSUE}.issue_reported", f"needle.events.rulebook.{ISSUE}.rulebook_published",
    subjects.timer_fired(TASK),
])
def test_parse_issue_subject_rejects_anything_else(subject: str) -> None:
    with pytest.raises(ValueError, match="not an issue event subject"):
        subjects.parse_issue_subject(subject)


@pytest.mark.parametrize("token", ["", "a.b", "*", ">", "a b", "a\tb", "x" * 65, "路"])
def test_a_subject_token_has_no_dots_wildcards_or_spaces(token: str) -> None:
    assert not subjects.valid_token(token)


# -- ids ------------------------------------------------------------------------------------------------------
MS = st.integers(0, 2**50 - 1)
RANDOM80 = st.integers(0, 2**80 - 1)


@settings(max_examples=200)
@given(a=st.tuples(MS, RANDOM80), b=st.tuples(MS, RANDOM80))
def test_issue_ids_are_26_chars_and_sort_by_report_time(a: tuple[int, int], b: tuple[int, int]) -> None:
    ia, ib = ids.new_issue_id(*a), ids.new_issue_id(*b)
    assert len(ia) == len(ib) == 26
    assert ids.check_issue_id(ia) == ia
    if a[0] < b[0]:
        assert ia < ib
    if a < b:  # same ms: the random part orders them
        assert ia <= ib
    assert (ia == ib) == (a == b)


def test_an_issue_id_starts_with_the_report_time() -> None:
    now_ms = int(T0.timestamp() * 1000)
    assert ids.new_issue_id(now_ms, 0)[:10] == ids.new_issue_id(now_ms, 2**80 - 1)[:10]
    assert ids.new_issue_id(now_ms, 0)[:10] < ids.new_issue_id(now_ms + 1, 0)[:10]


def test_an_idempotent_issue_id_is_deterministic_per_reporter_and_key() -> None:
    a = ids.idempotent_issue_id("grid_worker:area:wuxing-g1", "key-1")
    assert a == ids.idempotent_issue_id("grid_worker:area:wuxing-g1", "key-1")
    assert len(a) == 26 and ids.check_issue_id(a) == a
    # another reporter with the same key, or the same reporter with another key, gets another issue
    assert a != ids.idempotent_issue_id("grid_worker:area:wuxing-g2", "key-1")
    assert a != ids.idempotent_issue_id("grid_worker:area:wuxing-g1", "key-2")
    # the boundary between reporter and key matters
    assert ids.idempotent_issue_id("ab", "c") != ids.idempotent_issue_id("a", "bc")


@settings(max_examples=100)
@given(ms=MS, r=RANDOM80, n=st.integers(1, 10_000))
def test_a_task_id_names_its_issue(ms: int, r: int, n: int) -> None:
    issue = ids.new_issue_id(ms, r)
    task = ids.task_id(issue, n)
    assert task == f"{issue}-{n}"
    assert ids.issue_of_task(task) == issue


@pytest.mark.parametrize("task", ["", "abc", "abc-", "-1", "abc-x", "abc-1a", "*-1", ">-1", "a.b-1", "a*-1",
                                  "abc-1\n", "abc-\u0661", "x" * 41 + "-1", "abc-1234567"])
def test_a_task_id_that_is_no_issue_and_ordinal_is_invalid_naming_the_path_param(task: str) -> None:
    with pytest.raises(Invalid) as info:
        ids.issue_of_task(task)
    assert info.value.field == "task_id" and info.value.status == 422


@pytest.mark.parametrize("issue_id", ["", "a.b", "*", ">", "abc.*", "a b", "ABC", "x" * 41, "abc-1", "abci",
                                      "abc\n", "\u0661"])
def test_check_issue_id_rejects_ids_that_could_not_be_subject_tokens_or_ours(issue_id: str) -> None:
    with pytest.raises(Invalid) as info:
        ids.check_issue_id(issue_id)
    assert info.value.field == "issue_id" and info.value.status == 422


@pytest.mark.parametrize("issue_id", ["*", ">", "a.b", ""])
def test_the_issue_subject_refuses_a_wildcard_as_a_last_line(issue_id: str) -> None:
    with pytest.raises(ValueError):
        subjects.issue_events(issue_id)


@pytest.mark.parametrize("key", ["", "x" * 201, "a\nb", "a\x00b"])
def test_an_idempotency_key_must_be_1_to_200_printable_characters(key: str) -> None:

    with pytest.raises(Invalid):
        ids.check_idempotency_key(key)
    assert ids.check_idempotency_key("k" * 200) == "k" * 200


# -- auth -----------------------------------------------------------------------------------------------------
KEY = b"0123456789abcdef" * 4


def test_an_issued_token_verifies_to_its_principal() -> None:
    token = auth.issue_token(KEY, role="handler", scope="dept:dinghai-roads", ttl_s=600)
    p = auth.TokenVerifier(KEY).verify(token)
    assert (p.subject, p.role, p.scope) == ("handler:dept:dinghai-roads", "handler", "dept:dinghai-roads")
    assert (p.scope_kind, p.scope_id) == ("dept", "dinghai-roads")
    assert len(p.token_id) == 32
    # and a second verification (from the cache) gives the same principal
    verifier = auth.TokenVerifier(KEY)
    assert verifier.verify(token) == verifier.verify(token) == p


def test_a_token_keeps_an_explicit_subject_and_an_empty_scope() -> None:
    token = auth.issue_token(KEY, role="admin", scope="", subject="ops@needle")
    p = auth.TokenVerifier(KEY).verify(token)
    assert (p.subject, p.role, p.scope, p.scope_kind, p.scope_id) == ("ops@needle", "admin", "", "", "")


def test_two_tokens_for_the_same_role_have_distinct_ids() -> None:
    v = auth.TokenVerifier(KEY)
    a = v.verify(auth.issue_token(KEY, role="integrator", scope=""))
    b = v.verify(auth.issue_token(KEY, role="integrator", scope=""))
    assert a.token_id != b.token_id


def test_an_expired_token_is_refused() -> None:
    # given a token issued two hours ago for one minute
    token = auth.issue_token(KEY, role="supervisor", scope="area:dinghai", ttl_s=60, now=time.time() - 7200)
    # when it is verified now, then it is refused as expired
    with pytest.raises(auth.TokenError, match="expired"):
        auth.TokenVerifier(KEY).verify(token)


def test_a_token_verified_at_a_now_after_its_expiry_is_refused() -> None:
    # given a one-minute token, verified (and cached) while valid
    issued = time.time()
    token = auth.issue_token(KEY, role="supervisor", scope="area:dinghai", ttl_s=60, now=issued)
    v = auth.TokenVerifier(KEY)
    v.verify(token, now=issued)
    # when it is verified an hour later, then it is refused, by a fresh verifier and by the caching one
    for verifier in (auth.TokenVerifier(KEY), v):
        with pytest.raises(auth.TokenError, match="expired"):
            verifier.verify(token, now=issued + 3600)


def test_a_token_signed_with_another_key_is_refused() -> None:
    token = auth.issue_token(b"another key entirely, 32 bytes!!", role="admin", scope="")
    with pytest.raises(auth.TokenError, match="invalid"):
        auth.TokenVerifier(KEY).verify(token)


@pytest.mark.parametrize("mangle", [lambda s: s[:-2] + ("AA" if s[-2:] != "AA" else "BB"), lambda s: s + "x",
                                    lambda s: "not.a.jwt", lambda s: ""])
def test_a_tampered_or_malformed_token_is_refused(mangle: object) -> None:
    token = auth.issue_token(KEY, role="admin", scope="")
    with pytest.raises(auth.TokenError):
        auth.TokenVerifier(KEY).verify(mangle(token))  # type: ignore[operator]


def test_a_revoked_token_is_refused_even_after_it_was_cached() -> None:
    # given a token verified once (now in the verifier's cache)
    token = auth.issue_token(KEY, role="grid_worker", scope="area:wuxing-g1")
    v = auth.TokenVerifier(KEY)
    p = v.verify(token)
    # when its jti is revoked, then it is refused
    v.revoked.add(p.token_id)
    with pytest.raises(auth.TokenError, match="revoked"):
        v.verify(token)
    # and a fresh verifier that knows the revocation refuses it too
    fresh = auth.TokenVerifier(KEY)
    fresh.revoked.add(p.token_id)
    with pytest.raises(auth.TokenError, match="revoked"):
        fresh.verify(token)


@pytest.mark.parametrize("claims", [
    {"role": "god", "scope": ""},                      # unknown role
    {"role": "admin", "scope": 7},                     # scope not a string
    {"role": "admin", "scope": "", "iss": "someone"},  # another issuer
    {"role": "admin", "scope": "", "jti": None},       # no token id
    {"role": "admin", "scope": "", "exp": None},       # no expiry
])
def test_a_validly_signed_token_with_bad_claims_is_refused(claims: dict[str, object]) -> None:
    now = int(time.time())
    base: dict[str, object] = {"iss": "needle", "sub": "x", "iat": now, "exp": now + 600, "jti": "abc"}
    payload = {k: v for k, v in {**base, **claims}.items() if v is not None}
    token = jwt.encode(payload, KEY, algorithm="HS256")
    with pytest.raises(auth.TokenError):
        auth.TokenVerifier(KEY).verify(token)


def test_a_token_of_another_algorithm_is_refused() -> None:
    now = int(time.time())
    token = jwt.encode({"iss": "needle", "sub": "x", "role": "admin", "scope": "", "iat": now, "exp": now + 60,
                        "jti": "j"}, KEY, algorithm="HS512")
    with pytest.raises(auth.TokenError):
        auth.TokenVerifier(KEY).verify(token)


@pytest.mark.parametrize(("role", "scope"), [
    ("grid_worker", "area:wuxing-g1"), ("handler", "dept:dinghai-roads"), ("supervisor", "area:dinghai"),
    ("integrator", ""), ("admin", ""), ("admin", "*"),
])
def test_validate_scope_accepts_the_scope_each_role_needs(role: str, scope: str) -> None:
    auth.validate_scope(role, scope)


@pytest.mark.parametrize(("role", "scope"), [
    ("grid_worker", "dept:dinghai-roads"), ("grid_worker", ""), ("handler", "area:wuxing-g1"), ("handler", "dinghai"),
    ("supervisor", "dept:x"), ("supervisor", ""),
])
def test_validate_scope_refuses_a_scope_of_the_wrong_kind(role: str, scope: str) -> None:
    with pytest.raises(ValueError, match="needs scope"):
        auth.validate_scope(role, scope)
    with pytest.raises(ValueError):
        auth.issue_token(KEY, role=role, scope=scope)


@pytest.mark.parametrize("role", ["root", "", "Admin", "grid-worker"])
def test_validate_scope_refuses_an_unknown_role(role: str) -> None:
    with pytest.raises(ValueError, match="unknown role"):
        auth.validate_scope(role, "area:x")


def test_base32_digits_are_the_bits_most_significant_first_at_every_length() -> None:
    """Ids already stored must keep their spelling: two digits per step must equal one digit per step, odd
    lengths (idempotent ids: 25) included."""
    import random

    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
    rng = random.Random(7)
    for length in range(1, 41):
        for _ in range(200):
            value = rng.getrandbits(rng.choice([5 * length, 5 * length + 9, 256]))
            one_by_one = "".join(alphabet[(value >> 5 * (length - 1 - i)) & 31] for i in range(length))
            assert ids._b32(value, length) == one_by_one, (value, length)


@pytest.mark.parametrize("content", [b"", b"\n", b"secret", b"x" * 31])
def test_a_short_or_empty_token_key_is_refused(tmp_path: Path, content: bytes) -> None:
    path = auth.key_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(auth.TokenKeyError):
        auth.load_or_create_key(tmp_path)
    with pytest.raises(auth.TokenKeyError):
        auth.TokenVerifier(content.strip())
    with pytest.raises(auth.TokenKeyError):
        auth.issue_token(content.strip(), role="admin", scope="")


def test_a_new_token_key_is_64_hex_characters(tmp_path: Path) -> None:
    key = auth.load_or_create_key(tmp_path)
    assert len(key) == 64 and auth.load_or_create_key(tmp_path) == key


@pytest.mark.parametrize("raw", ["²", "١٢", "9" * 21, "1" * 5000, str(2**64), "-1", "1 2"])
def test_last_event_id_that_is_no_ascii_sequence_is_invalid_not_a_crash(raw: str) -> None:
    from services.intake.events_api import parse_last_id

    with pytest.raises(Invalid) as info:
        parse_last_id(raw, None)
    assert info.value.field == "Last-Event-ID"
    assert parse_last_id(str(2**64 - 1), None) == 2**64 - 1


def test_each_token_holder_gets_a_subject_of_its_own_and_a_lifetime_for_its_role() -> None:
    a = auth.plan_token("grid_worker", "area:wuxing-g1", None, None)
    b = auth.plan_token("grid_worker", "area:wuxing-g1", None, None)
    assert a.generated and a.subject != b.subject and a.subject.startswith("grid_worker:area:wuxing-g1:")
    assert a.ttl_s == 7 * 86400
    assert auth.plan_token("admin", "", None, None).ttl_s == 8 * 3600
    assert auth.plan_token("integrator", "", None, None).ttl_s == 90 * 86400
    assert all(ttl <= 90 * 86400 for ttl in auth.DEFAULT_TTL_S.values()) and set(auth.DEFAULT_TTL_S) == set(auth.ROLES)
    named = auth.plan_token("integrator", "", "city-portal", 3600)
    assert (named.subject, named.ttl_s, named.generated) == ("city-portal", 3600, False)
    for bad in [("mayor", "", None, None), ("admin", "", "  ", None), ("admin", "", None, 0)]:
        with pytest.raises(ValueError):
            auth.plan_token(*bad)


def test_secrets_made_by_racing_processes_are_never_seen_half_written(tmp_path: Path) -> None:
    """needle up and its children make DIR/secrets together: every reader gets the whole, one winning key."""
    import multiprocessing

    from shared.privacy.keystore import load_or_create_kek
    from shared.settings import Settings

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(8) as pool:
        keks = pool.map(load_or_create_kek, [Settings(data_dir=tmp_path)] * 32)
        keys = pool.starmap(auth.load_or_create_key, [(tmp_path,)] * 32)
    assert len(set(keks)) == 1 and len(keks[0]) == 32
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    assert sorted(p.name for p in (tmp_path / "secrets").iterdir()) == ["resident-kek.key", "token.key"]
