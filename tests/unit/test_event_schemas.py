"""The event contract: every event type has a unique versioned CloudEvents type, its generated JSON Schema
matches the snapshot committed under tests/contract/schemas (a change needs a new type version), sample
events validate against their published schema, and docs/ holds what the generator writes."""
from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shared.events import schemas
from shared.events.codec import UPCASTERS, Envelope, encode
from shared.events.models import BY_NAME, EVENT_TYPES, Event

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOTS = ROOT / "tests" / "contract" / "schemas"
DOCS = ROOT / "docs"
REFRESH = "python -m shared.events.schemas tests/contract/schemas"

T = datetime(2026, 3, 2, 1, 30, tzinfo=UTC)
TASK: dict[str, Any] = {"task_id": "01TASK0000000000000000000A"}
SAMPLES: dict[str, dict[str, Any]] = {
    "issue_reported": {"grid": "zhanmao-g33", "category": "construction_nuisance", "title": "blasting at night",
                       "description": "dust and noise", "urgency": "urgent", "risk": ["collective_petition"],
                       "location": {"lat": 30.03, "lon": 122.24, "address": "张家宕"}, "reporter": "gw:33",
                       "reported_at": T, "request_hash": "ab" * 32, "description_public": True,
                       "resident": {"id": "res_0123456789abcdef01234567", "key_id": "0a1b2c3d4e5f6071",
                                    "ciphertext": "c2VhbGVk", "nonce": "AAAAAAAAAAAAAAAA"}},
    "issue_resolved_on_site": {"by": "gw:33", "note": "talked to the site manager",
                               "media": [{"id": "ab" * 32, "phase": "after"}]},
    "issue_accepted": {"by": "h:zhanmao-center", "reason": "属实"},
    "issue_rejected": {"by": "h:zhanmao-center", "reason": "不属于政府职责范围"},
    "issue_voided": {"by": "sup:putuo", "reason": "测试"},
    "issue_recategorised": {"by": "sup:putuo", "reason": "实为噪声", "from_category": "road_damage",
                            "to_category": "construction_nuisance", "from_grid": "zhanmao-g33",
                            "to_grid": "zhanmao-g32"},
    "issue_routed": {"level": "community", "owner_area": "dazhan", "reason": "reported",
                     "rule": "construction_nuisance@community", "rulebook_version": "r1", "caused_by": 7},
    "task_dispatched": TASK | {"department": "dazhan-committee", "role": "lead", "level": "community",
                               "clock": "working", "dispatched_at": T, "acknowledge_due": T + timedelta(hours=4),
                               "resolve_due": T + timedelta(days=2), "acknowledge_warn": T + timedelta(hours=3),
                               "resolve_warn": T + timedelta(days=1)},
    "task_acknowledged": TASK | {"by": "h:dazhan", "at": T},
    "task_returned": TASK | {"by": "h:dazhan", "reason": "not ours", "at": T},
    "task_resolved": TASK | {"by": "h:dazhan", "note": "stopped", "at": T},
    "task_superseded": TASK | {"reason": "escalated to street"},
    "sla_warned": TASK | {"clock": "acknowledge", "due": T},
    "sla_breached": TASK | {"clock": "resolve", "due": T},
    "review_warned": {"due": T},
    "issue_merged": {"by": "h:zhanmao-center", "into": "01ISSUE000000000000000000B", "reason": "同一处塌陷"},
    "issue_duplicate_attached": {"duplicate": "01ISSUE000000000000000000A", "caused_by": 9},
    "issue_closed_with_target": {"into": "01ISSUE000000000000000000B", "on_time": True, "closed_at": T,
                                 "caused_by": 12},
    "review_breached": {"due": T},
    "issue_escalated": {"from_level": "community", "to_level": "street", "cause": "acknowledge_breach"},
    "extension_requested": TASK | {"by": "h:dazhan", "extension": timedelta(days=1), "reason": "parts"},
    "extension_approved": TASK | {"by": "sup:zhanmao", "resolve_due": T, "resolve_warn": T},
    "issue_verified": {"passed": False, "by": "gw:33", "note": "still noisy"},
    "issue_reopened": {"reason": "still noisy", "reopen_count": 1},
    "issue_closed": {"reason": "verified", "on_time": True, "closed_at": T},
    "feedback_recorded": {"satisfaction": "basically_satisfied", "by": "gw:33"},
    "resident_feedback_recorded": {"solved": True, "satisfaction": "satisfied", "comment": "谢谢",
                                   "at": "2026-11-08T02:00:00Z"},
    "issue_urged": {"by": "sup:putuo", "note": "today please", "task_id": "01TASK0000000000000000000A"},
    "rulebook_published": {"rulebook_version": "r1", "source": "deploy/rules/zhoushan.yaml", "text": "calendar: x",
                           "categories": ["sea_safety"], "by": "needle up"},
    "visit_recorded": {"grid": "zhanmao-g33", "household": "ab" * 32, "kind": "routine", "visited_at": T,
                       "by": "gw:33", "note": "slope works: dust and blasting",
                       "issues": ["01ISSUE000000000000000000A"],
                       "request_hash": "cd" * 32},
    "resident_forgotten": {"resident_id": "res_0123456789abcdef01234567", "key_ids": ["0a1b2c3d4e5f6071"],
                           "by": "admin", "at": T},
    "return_requested": TASK | {"by": "h:dazhan", "reason": "not ours", "at": T},
    "return_rejected": TASK | {"by": "h:center", "reason": "it is yours"},
    "return_approved": TASK | {"by": "h:center", "reason": "ok", "to_department": "dinghai-roads",
                               "to_task_id": "01TASK0000000000000000000B", "at": T},
    "task_reassigned": TASK | {"to_task_id": "01TASK0000000000000000000B", "from_department": "a",
                               "to_department": "b", "by": "sup:putuo", "reason": "wrong unit", "clocks": "restart"},
    "extension_rejected": TASK | {"by": "sup:putuo", "reason": "no"},
    "suspension_requested": TASK | {"by": "h:dazhan", "reason": "court ruling", "until": T},
    "suspension_approved": TASK | {"by": "sup:putuo", "until": T, "at": T},
    "suspension_rejected": TASK | {"by": "sup:putuo", "reason": "no"},
    "suspension_review_due": TASK | {"until": T},
    "supervision_ordered": TASK | {"by": "sup:putuo", "due": T, "reason": "overdue twice",
                                   "remind_every": timedelta(days=1), "at": T},
    "supervision_reminded": TASK | {"due": T, "at": T},
    "supervision_closed": TASK | {"due": T, "on_time": True, "at": T},
    "comment_added": {"by": "h:dazhan", "role": "handler", "department": "dazhan-committee", "kind": "progress",
                      "text": "materials ordered", "task_id": "01TASK0000000000000000000A", "media": ["m/1.jpg"],
                      "at": T},
    "clocks_paused": TASK | {"cause": "info_request", "at": T},
    "clocks_resumed": TASK | {"cause": "info_request", "at": T, "acknowledge_due": T, "resolve_due": T,
                              "acknowledge_warn": T, "resolve_warn": T},
    "progress_missed": TASK | {"due": T, "caused_by": 3},
    "description_publication_changed": {"public": True, "by": "sup:putuo", "reason": "无个人信息"},
    "task_resumed": TASK | {"by": "h:dazhan", "at": T, "acknowledge_due": T, "resolve_due": T,
                            "acknowledge_warn": T, "resolve_warn": T},
    "issue_text_shredded": {"by": "needle/retention", "reason": "retention", "key_id": "3f9a0c1e5b7d2a46",
                            "closed_at": "2026-01-01T00:00:00Z", "at": "2026-02-01T00:00:00Z"},
}


def cloudevent(model: type[Event], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sample event exactly as it travels on NATS (encoded by the codec, read back as JSON)."""
    ev = model.model_validate(data if data is not None else SAMPLES[model.name])
    env = Envelope(id="01ISSUE000000000000000000A.3", source="needle/intake", subject="01ISSUE000000000000000000A",
                   time=T, data=ev, actor="gw:33", causationid="route:01ISSUE000000000000000000A:2", seq=41)
    out: dict[str, Any] = json.loads(encode(env))
    return out


def validator(ce_type: str) -> jsonschema.Draft7Validator:
    schema = schemas.schema_for(ce_type)
    assert schema is not None
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def snapshot(ce_type: str) -> dict[str, Any] | None:
    path = SNAPSHOTS / schemas.file_name(ce_type)
    return json.loads(path.read_text("utf-8")) if path.exists() else None


# -- identity and versions -------------------------------------------------------------------------
def test_every_type_has_a_unique_versioned_ce_type() -> None:
    seen: dict[str, str] = {}
    for m in EVENT_TYPES:
        assert re.fullmatch(r"needle(\.[a-z_]+){2}\.v[1-9][0-9]*", m.ce_type), m.ce_type
        assert m.ce_type.endswith(f".v{m.version}"), f"{m.__name__}: {m.ce_type} does not end in .v{m.version}"
        assert m.ce_type not in seen, f"{m.__name__} and {seen[m.ce_type]} share {m.ce_type}"
        seen[m.ce_type] = m.__name__
    assert len(BY_NAME) == len(EVENT_TYPES), "two models share a subject name"


# -- the contract snapshot -------------------------------------------------------------------------
@pytest.mark.parametrize("model", EVENT_TYPES, ids=lambda m: m.ce_type)
def test_schema_matches_its_snapshot(model: type[Event]) -> None:
    generated = schemas.envelope_schema(model)
    committed = snapshot(model.ce_type)
    assert committed is not None, f"no snapshot for new type {model.ce_type}: run `{REFRESH}` and commit it"
    if committed == generated:
        return
    breaking = schemas.breaking_changes(committed, generated)
    assert not breaking, (f"schema of {model.ce_type} changed without a version bump: add a new type version "
                          f"(e.g. .v{model.version + 1} with an upcaster in shared/events/codec.py). "
                          f"Changes: {breaking}")
    pytest.fail(f"schema of {model.ce_type} changed compatibly (optional fields or descriptions): "
                f"refresh its snapshot with `{REFRESH}`")


def test_retired_types_keep_their_snapshot_and_have_an_upcaster() -> None:
    current = {m.ce_type for m in EVENT_TYPES}
    for path in sorted(SNAPSHOTS.glob("*.json")):
        ce_type = path.name.removesuffix(".json")
        if ce_type not in current:
            assert ce_type in UPCASTERS, f"{ce_type} is no longer a model but has no upcaster in codec.py"


# -- published schemas validate real events --------------------------------------------------------
def test_there_is_a_sample_of_every_type() -> None:
    assert set(SAMPLES) == set(BY_NAME)


@pytest.mark.parametrize("model", EVENT_TYPES, ids=lambda m: m.ce_type)
def test_sample_event_validates_against_its_published_schema(model: type[Event]) -> None:
    schema = schemas.schema_for(model.ce_type)
    assert schema is not None
    jsonschema.Draft7Validator.check_schema(schema)
    v = validator(model.ce_type)
    ce = cloudevent(model)
    assert ce["dataschema"] == schema["$id"]
    v.validate(ce)
    # defaults left out: every optional field may be absent
    required = set(schema["properties"]["data"].get("required", []))
    v.validate(cloudevent(model, {k: v_ for k, v_ in SAMPLES[model.name].items() if k in required}))
    # consumers ignore what they do not know: unknown attributes and data fields still validate
    v.validate(ce | {"traceparent": "00-abc-def-01", "data": ce["data"] | {"added_in_a_later_release": 1}})


@pytest.mark.parametrize("model", EVENT_TYPES, ids=lambda m: m.ce_type)
def test_published_schema_rejects_what_is_not_that_event(model: type[Event]) -> None:
    v = validator(model.ce_type)
    ce = cloudevent(model)
    other = next(m for m in EVENT_TYPES if m is not model)
    assert not v.is_valid(ce | {"type": other.ce_type})
    assert not v.is_valid(ce | {"specversion": "0.3"})
    assert not v.is_valid({k: x for k, x in ce.items() if k != "data"})
    required = schemas.schema_for(model.ce_type)["properties"]["data"]["required"]  # type: ignore[index]
    assert not v.is_valid(ce | {"data": {k: x for k, x in ce["data"].items() if k != required[0]}})


def test_api_envelope_with_sequence_validates() -> None:
    m = BY_NAME["issue_reported"]
    env = Envelope(id="01ISSUE000000000000000000A.1", source="needle/intake", subject="01ISSUE000000000000000000A",
                   time=T, data=m.model_validate(SAMPLES[m.name]), seq=12)
    validator(m.ce_type).validate(json.loads(json.dumps(env.to_cloudevent())))


# -- the compatibility rule itself -----------------------------------------------------------------
def test_breaking_changes_allows_only_additive_optional_changes() -> None:
    old = schemas.envelope_schema(BY_NAME["issue_urged"])
    assert schemas.breaking_changes(old, old) == []

    def changed(edit: Any) -> list[str]:
        new = json.loads(json.dumps(old))
        edit(new["properties"]["data"])
        return schemas.breaking_changes(old, new)

    assert changed(lambda d: d["properties"].update(channel={"type": "string"})) == []  # optional field
    assert changed(lambda d: d.update(description="reworded")) == []
    assert changed(lambda d: (d["properties"].update(channel={"type": "string"}), d["required"].append("channel")))
    assert changed(lambda d: d["properties"].pop("note"))  # removed field
    assert changed(lambda d: d["properties"]["by"].update(type="integer"))  # retyped field
    assert changed(lambda d: d["required"].remove("by"))  # a field that was always there may now be missing
    # an optional field whose type is the schema's first definition (issue_routed's ``unserved``) is additive
    first = json.loads(json.dumps(old))
    first["definitions"] = {"Gap": {"type": "object", "properties": {"kind": {"type": "string"}}}}
    first["properties"]["data"]["properties"]["gaps"] = {"type": "array", "items": {"$ref": "#/definitions/Gap"}}
    assert "definitions" not in old and schemas.breaking_changes(old, first) == []
    assert schemas.breaking_changes(first, old)  # removing them is not


def test_generator_refuses_incompatible_overwrites(tmp_path: Path) -> None:
    schemas.write_schemas(tmp_path)
    path = tmp_path / "needle.issue.urged.v1.json"
    s = json.loads(path.read_text())
    s["properties"]["data"]["required"].append("urgency")
    path.write_text(json.dumps(s))
    with pytest.raises(schemas.IncompatibleChange, match=r"needle\.issue\.urged\.v1"):
        schemas.write_schemas(tmp_path)
    schemas.write_schemas(tmp_path, force=True)
    assert json.loads(path.read_text()) == schemas.schema_for("needle.issue.urged.v1")


# -- what docs/ publishes --------------------------------------------------------------------------
def test_docs_schemas_are_generated_and_current() -> None:
    for ce_type, schema in schemas.all_schemas().items():
        path = DOCS / "schemas" / schemas.file_name(ce_type)
        assert path.exists() and path.read_text("utf-8") == schemas.dumps(schema), (
            "docs/schemas is stale: run `python -m shared.events.schemas docs/schemas --asyncapi docs/asyncapi.yaml`")


def test_asyncapi_document_is_current_and_references_every_schema() -> None:
    text = (DOCS / "asyncapi.yaml").read_text("utf-8")
    assert text == schemas.asyncapi_yaml("schemas"), "docs/asyncapi.yaml is stale: rerun the generator"
    doc = yaml.safe_load(text)
    assert doc["asyncapi"] == "3.0.0"
    channels = doc["channels"]
    assert channels["issueEvents"]["address"] == "needle.events.issue.{issueId}.{eventName}"
    assert channels["rulebookEvents"]["address"] == "needle.events.rulebook.{version}.rulebook_published"
    assert channels["eventStream"]["address"] == "/v1/events/stream"
    messages = doc["components"]["messages"]
    for m in EVENT_TYPES:
        ref = messages[m.name]["payload"]["schema"]["$ref"]
        assert (DOCS / ref).exists(), ref
        assert messages[m.name]["title"] == m.ce_type
    for op in doc["operations"].values():  # every operation's message is one of its channel's
        channel = op["channel"]["$ref"].split("/")[-1]
        for msg in op["messages"]:
            assert msg["$ref"].split("/")[-1] in channels[channel]["messages"]
