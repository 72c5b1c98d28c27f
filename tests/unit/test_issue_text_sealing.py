"""The pure sealing of an issue's free text (shared/privacy/texts.py, issuekeys.open_with)."""
from __future__ import annotations

import dataclasses
import secrets
from datetime import UTC, datetime

import pytest

from shared.config.loader import ConfigError
from shared.config.rulebook import parse_rulebook
from shared.events import models as ev
from shared.events.codec import Envelope, decode, encode
from shared.privacy import texts
from shared.privacy.issuekeys import IssueKey, decode_key, encode_key, open_with
from shared.privacy.keystore import KeyStoreError

T0 = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
KEY = IssueKey("i1", "k1", secrets.token_bytes(32))


def reported(**extra: object) -> ev.IssueReported:
    fields: dict[str, object] = {"grid": "g1", "category": "road", "title": "Mrs Wang's drain",
                                 "description": "138 0013 8000", "reporter": "gw", "reported_at": T0,
                                 "location": ev.Location(lat=30.01234, lon=122.1, address="Lane 4")}
    return ev.IssueReported.model_validate(fields | extra)


def sealed_env(event: ev.Event, key: IssueKey = KEY, event_id: str = "i1.1") -> Envelope:
    data, token = texts.seal(key.key, key.key_id, secrets.token_bytes(12), "i1", event_id, event)
    return Envelope(id=event_id, source="t", subject="i1", time=T0, data=data, sealed=token, seq=1)


def test_the_sealed_fields_are_the_free_text_of_each_event_type() -> None:
    assert texts.sealed_fields(ev.IssueReported) == ("title", "description", "location", "media_url")
    assert texts.sealed_fields(ev.TaskReturned) == ("reason",)
    assert texts.sealed_fields(ev.CommentAdded) == ("text",)
    assert texts.sealed_fields(ev.IssueRouted) == ()  # its reason is an enumeration, not text
    assert texts.sealed_fields(ev.IssueTextShredded) == ()
    every = {f for m in ev.EVENT_TYPES for f in texts.sealed_fields(m)}
    assert every == {"title", "description", "location", "media_url", "note", "reason", "text", "comment"}


def test_a_sealed_event_holds_no_word_of_its_text_and_opens_with_its_key() -> None:
    env = sealed_env(reported())
    raw = encode(env)
    for words in (b"Wang", b"138 0013", b"Lane 4", b"30.01234"):
        assert words not in raw
    back = decode(raw, 1)
    assert back.sealed == env.sealed
    assert isinstance(back.data, ev.IssueReported)
    assert back.data.title == texts.SEALED and back.data.location is None and back.data.grid == "g1"
    opened = open_with(back, KEY)
    assert opened.data == reported() and opened.sealed is None


def test_without_its_key_or_with_another_the_text_reads_erased_and_nothing_crashes() -> None:
    env = decode(encode(sealed_env(reported())), 1)
    for key in (None, IssueKey("i1", "k2", secrets.token_bytes(32))):  # shredded; a key made after the shred
        gone = open_with(env, key)
        assert isinstance(gone.data, ev.IssueReported)
        assert gone.data.title == texts.ERASED and gone.data.description == texts.ERASED
        assert gone.data.location is None and gone.data.category == "road"
    forged = IssueKey("i1", "k1", secrets.token_bytes(32))  # the right id, the wrong bytes: never opens
    assert open_with(env, forged).data.title == texts.ERASED  # type: ignore[attr-defined]


def test_a_ciphertext_is_bound_to_its_issue_and_event() -> None:
    env = sealed_env(ev.TaskReturned(task_id="i1-1", by="h", reason="Mr Li owns it", at=T0))
    moved = dataclasses.replace(env, id="i1.2")  # the same ciphertext under another event
    assert open_with(moved, KEY).data.reason == texts.ERASED  # type: ignore[attr-defined]
    assert open_with(env, KEY).data.reason == "Mr Li owns it"  # type: ignore[attr-defined]
    with pytest.raises(texts.Unreadable):
        texts.open_fields(KEY.key, "i2", env.id, env.sealed or "")


def test_an_event_without_text_is_not_sealed_and_optional_text_left_out_stays_none() -> None:
    dispatched_like = ev.TaskAcknowledged(task_id="i1-1", by="h", at=T0)
    assert texts.seal(KEY.key, KEY.key_id, secrets.token_bytes(12), "i1", "i1.1", dispatched_like) == \
        (dispatched_like, None)
    plain = reported(description=None, location=None)
    env = sealed_env(plain)
    assert env.data.description is None  # type: ignore[attr-defined]
    assert open_with(env, KEY).data == plain
    assert open_with(env, None).data.description is None  # type: ignore[attr-defined]


def test_an_issue_key_is_stored_wrapped_and_opens_only_with_its_kek() -> None:
    kek = secrets.token_bytes(32)
    raw = encode_key(KEY, kek)
    assert KEY.key not in raw and b"wrapped" in raw
    assert decode_key("i1", raw, 3, kek).key == KEY.key
    with pytest.raises(KeyStoreError):
        decode_key("i1", raw, 3, secrets.token_bytes(32))
    with pytest.raises(KeyStoreError):
        decode_key("i2", raw, 3, kek)  # bound to its issue


def test_the_rulebook_sets_how_long_a_closed_issues_text_is_kept() -> None:
    base = "categories:\n  c:\n    name: C\n    start: community\n    sla: {acknowledge: PT1H, resolve: P1D}\n" \
           "    handlers: {community: {lead: committee}}\n"
    assert parse_rulebook(base).text_retention is None
    assert parse_rulebook(base + "retention: {closed_text: P365D}\n").text_retention.days == 365  # type: ignore
    with pytest.raises(ConfigError, match=r"retention\.closed_text"):
        parse_rulebook(base + "retention: {closed_text: P0D}\n")
    with pytest.raises(ConfigError, match="retention"):
        parse_rulebook(base + "retention: {closed_txt: P1D}\n")


def test_text_an_earlier_needle_wrote_in_clear_reads_erased_once_its_issue_was_shredded() -> None:
    from shared.privacy.issuekeys import erase_before_shreds

    def env(seq: int, data: ev.Event) -> Envelope:
        return Envelope(id=f"i1.{seq}", source="t", subject="i1", time=T0, data=data, seq=seq)

    old = [env(1, reported()), env(2, ev.CommentAdded(by="gw", role="grid_worker", text="Mrs Wang again", at=T0))]
    assert erase_before_shreds(old) == old  # no shred: as written
    shred = env(3, ev.IssueTextShredded(by="needle/retention", reason="retention", at=T0))
    later = env(4, ev.CommentAdded(by="gw", role="grid_worker", text="written after", at=T0))
    out = erase_before_shreds([*old, shred, later])
    assert out[0].data.title == texts.ERASED and out[0].data.grid == "g1"  # type: ignore[attr-defined]
    assert out[1].data.text == texts.ERASED  # type: ignore[attr-defined]
    assert out[3].data.text == "written after"  # type: ignore[attr-defined]
