"""Residents' personal data, pure parts: sealing (AES-256-GCM round trip, tampering, wrong key, binding to
the resident), phone normalization, the request body's validation, the decider carrying the sealed resident,
Open311's requester fields and the subject filters of the new event type."""
from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from services.intake.issues_api import request_hash
from services.intake.schemas import ReportIssueBody, issue_view
from services.open311.inputs import resident_of
from shared.domain import commands as cmd
from shared.domain.issue import decide, evolve, initial_state
from shared.events import subjects as sj
from shared.events.models import ResidentRef
from shared.privacy import sealing

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NONCE = bytes(12)
DATA = sealing.ResidentData(name="张三", phone="+8613800138000")
T0 = datetime(2026, 3, 2, 1, 30, tzinfo=UTC)


def sealed(**changes: str) -> ResidentRef:
    ref = sealing.seal(KEY, NONCE, "res_1", "k1", DATA)
    return ref.model_copy(update=changes)


def test_seal_round_trip_holds_no_clear_data() -> None:
    ref = sealed()
    assert ref.id == "res_1" and ref.key_id == "k1"
    raw = ref.model_dump_json().encode()
    assert b"13800138000" not in raw and "张三".encode() not in raw and b"\\u5f20" not in raw
    assert sealing.unseal(KEY, ref) == DATA


def test_a_fresh_nonce_gives_another_ciphertext_of_the_same_data() -> None:
    a = sealing.seal(KEY, NONCE, "res_1", "k1", DATA)
    b = sealing.seal(KEY, b"\x01" * 12, "res_1", "k1", DATA)
    assert a.ciphertext != b.ciphertext
    assert sealing.unseal(KEY, a) == sealing.unseal(KEY, b) == DATA


def test_tampered_ciphertext_is_unreadable() -> None:
    ct = bytearray(base64.b64decode(sealed().ciphertext or ""))
    ct[0] ^= 1
    with pytest.raises(sealing.Unreadable):
        sealing.unseal(KEY, sealed(ciphertext=base64.b64encode(bytes(ct)).decode()))


@pytest.mark.parametrize("changes", [{"id": "res_2"}, {"key_id": "k2"},
                                     {"nonce": base64.b64encode(b"\x02" * 12).decode()},
                                     {"ciphertext": "!!not base64!!"}])
def test_ciphertext_is_bound_to_its_resident_key_and_nonce(changes: dict[str, str]) -> None:
    with pytest.raises(sealing.Unreadable):
        sealing.unseal(KEY, sealed(**changes))


def test_another_key_cannot_open_it() -> None:
    with pytest.raises(sealing.Unreadable):
        sealing.unseal(OTHER_KEY, sealed())


def test_a_resident_with_only_an_id_has_nothing_to_open() -> None:
    with pytest.raises(sealing.Unreadable):
        sealing.unseal(KEY, ResidentRef(id="res_1"))


@pytest.mark.parametrize(("raw", "e164"), [
    ("13800138000", "+8613800138000"), ("138 0013 8000", "+8613800138000"), ("+86 138-0013-8000", "+8613800138000"),
    ("0086 13800138000", "+8613800138000"), ("19912345678", "+8619912345678"),
    ("0580-2281234", "+865802281234"),  # a Zhoushan landline
])
def test_phone_normalization(raw: str, e164: str) -> None:
    assert sealing.normalize_phone(raw) == e164


@pytest.mark.parametrize("raw", ["12345", "12800138000", "1380013800", "138001380001", "call me", "", "+86"])
def test_invalid_phones_are_refused_without_echoing_them(raw: str) -> None:
    with pytest.raises(ValueError) as exc:
        sealing.normalize_phone(raw)
    assert not raw or raw not in str(exc.value)


def test_fingerprint_depends_on_data_and_key() -> None:
    fp = sealing.fingerprint(KEY, DATA)
    assert fp == sealing.fingerprint(KEY, sealing.ResidentData("张三", "+8613800138000"))
    assert fp != sealing.fingerprint(KEY, sealing.ResidentData("张三", "+8613800138001"))
    assert fp != sealing.fingerprint(OTHER_KEY, DATA)
    assert "13800138000" not in fp


def body(**resident: object) -> ReportIssueBody:
    return ReportIssueBody.model_validate({"grid": "g", "category": "c", "title": "t", "resident": resident})


def test_report_body_normalizes_the_phone_and_names_bad_fields() -> None:
    assert body(name="张三", phone="138 0013 8000").resident.phone == "+8613800138000"  # type: ignore[union-attr]
    for resident, loc in (({"phone": "123"}, ("resident", "phone")), ({}, ("resident",)),
                          ({"name": ""}, ("resident", "name")), ({"id": "a.b", "name": "x"}, ("resident", "id")),
                          ({"name": "x", "address": "y"}, ("resident", "address"))):
        with pytest.raises(ValidationError) as exc:
            body(**resident)
        assert exc.value.errors()[0]["loc"] == loc, (resident, exc.value.errors())


def test_request_hash_holds_the_resident_only_as_a_keyed_fingerprint() -> None:
    b = body(name="张三", phone="13800138000")
    h1 = request_hash(b, sealing.fingerprint(KEY, DATA))
    assert h1 == request_hash(body(name="张三", phone="+86 13800138000"), sealing.fingerprint(KEY, DATA))
    assert h1 != request_hash(b, sealing.fingerprint(OTHER_KEY, DATA))
    # without the key the hash cannot be recomputed from the clear data alone
    assert h1 != request_hash(b, None)


def test_decider_records_the_sealed_resident_and_the_fold_keeps_it() -> None:
    ref = sealed()
    [event] = decide(initial_state("I1"), cmd.ReportIssue(grid="g", category="c", title="t", reporter="gw",
                                                           resident=ref), T0)
    assert event.resident == ref  # type: ignore[attr-defined]
    state = evolve(initial_state("I1"), event, 1)
    assert state.resident == ref
    assert issue_view(state)["resident"] == {"id": "res_1"}  # by default a view shows the id only
    assert issue_view(state, {"id": "res_1", "name": "张三"})["resident"]["name"] == "张三"


@pytest.mark.parametrize(("params", "expected"), [
    ({"first_name": ["小明"], "last_name": ["王"], "phone": ["13800138000"]},
     {"name": "王小明", "phone": "13800138000"}),
    ({"first_name": ["Ming"], "last_name": ["Wang"]}, {"name": "Ming Wang"}),
    ({"phone": [" 13800138000 "], "email": ["a@b.cn"]}, {"phone": "13800138000"}),
    ({"email": ["a@b.cn"], "device_id": ["d"]}, None),
])
def test_open311_requester_fields(params: dict[str, list[str]], expected: dict[str, str] | None) -> None:
    assert resident_of(params) == expected


def test_resident_events_have_their_own_subject_family() -> None:
    assert sj.resident_event("res_1", "resident_forgotten") == "needle.events.resident.res_1.resident_forgotten"
    assert sj.filter_of_type("resident_forgotten") == "needle.events.resident.*.resident_forgotten"
    assert sj.filter_of_type("rulebook_published") == "needle.events.rulebook.*.rulebook_published"
    assert sj.filter_of_type("task_dispatched") == sj.events_of_type("task_dispatched")


def test_webhook_payloads_carry_the_resident_id_only() -> None:
    import orjson

    from services.integrations.delivery import render
    from shared.events.codec import Envelope, encode

    [event] = decide(initial_state("I1"), cmd.ReportIssue(grid="g", category="c", title="t", reporter="gw",
                                                           resident=sealed()), T0)
    env = Envelope(id="I1.1", source="needle/intake", subject="I1", time=T0, data=event)
    payload = render(encode(env), 7)
    ce = orjson.loads(payload.body)
    assert ce["data"]["resident"] == {"id": "res_1"} and ce["sequence"] == 7
