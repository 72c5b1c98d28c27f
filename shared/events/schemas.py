"""The published event contract: one JSON Schema per CloudEvents ``type`` and an AsyncAPI 3.0 document.

Each schema is the CloudEvents 1.0 envelope needle writes (``codec.py``) with ``type`` fixed to one
``ce_type`` and ``data`` = the pydantic model's ``model_json_schema()``, made consumer-facing:

* draft-07 (the dialect AsyncAPI 3.0 tools must read): the model's ``$defs`` move to the root
  ``definitions`` and its ``$ref``s follow;
* open objects: ``additionalProperties: false`` (the models forbid extra fields when *needle*
  writes) is dropped, because consumers must ignore attributes they do not know (docs/EVENTS.md),
  so an event carrying a later optional field still validates against the schema of its version.

Regenerate the published files (and the contract snapshots) with::

    python -m shared.events.schemas docs/schemas --asyncapi docs/asyncapi.yaml
    python -m shared.events.schemas tests/contract/schemas
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from . import subjects as sj
from .codec import SPECVERSION
from .models import EVENT_TYPES, Event, ResidentForgotten, RulebookPublished, VisitRecorded

DRAFT = "http://json-schema.org/draft-07/schema#"
SCHEMA_FORMAT = "application/schema+json;version=draft-07"
SCHEMA_MEDIA_TYPE = "application/schema+json"
OVERFLOW_EVENT = "needle.stream.overflow"  # the SSE stream's last word to a client that reads too slowly


def schema_id(ce_type: str) -> str:
    """The schema's ``$id``; needle's CloudEvents carry the same value in ``dataschema``."""
    return f"urn:needle:schema:{ce_type}"


def file_name(ce_type: str) -> str:
    return f"{ce_type}.json"


def _open_objects(node: Any) -> Any:
    """Drop ``additionalProperties: false`` and point ``$ref`` at ``#/definitions`` (recursively)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            if k == "additionalProperties" and v is False:
                continue
            if k == "$ref" and isinstance(v, str):
                out[k] = v.replace("#/$defs/", "#/definitions/")
                continue
            out[k] = _open_objects(v)
        return out
    if isinstance(node, list):
        return [_open_objects(v) for v in node]
    return node


def data_schema(model: type[Event]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's schema for ``data`` and its shared definitions (both consumer-facing)."""
    raw = copy.deepcopy(model.model_json_schema())
    defs = raw.pop("$defs", {})
    return _open_objects(raw), _open_objects(defs)


def is_sealable(model: type[Event]) -> bool:
    """Whether events of this type may carry sealed free text (an issue's event with text fields)."""
    from shared.privacy.texts import sealed_fields

    return model.name not in sj.NON_ISSUE_EVENTS and bool(sealed_fields(model))


def _str(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "description": description, **extra}


def envelope_schema(model: type[Event]) -> dict[str, Any]:
    """The full schema of one event type: the CloudEvents envelope around the model's data."""
    data, defs = data_schema(model)
    if model is RulebookPublished:
        subject = _str("the rulebook version (its content digest)")
        ident = _str("'rulebook.<version>'")
    elif model is ResidentForgotten:
        subject = _str("the resident id")
        ident = _str("'resident.<resident id>.<key ids>': the dedupe key")
    elif model is VisitRecorded:
        subject = _str("the visit id")
        ident = _str("'<visit id>.1': the dedupe key", pattern=r"^.+\.[0-9]+$")
    else:
        subject = _str("the issue id")
        ident = _str("'<issue id>.<n>': the n-th event of the issue; the dedupe key", pattern=r"^.+\.[0-9]+$")
    schema: dict[str, Any] = {
        "$schema": DRAFT,
        "$id": schema_id(model.ce_type),
        "title": model.ce_type,
        "description": f"CloudEvents 1.0 envelope of a needle '{model.name}' event (schema version "
                       f"{model.version}). Consumers must ignore attributes they do not know.",
        "type": "object",
        "required": ["specversion", "id", "source", "type", "subject", "time", "datacontenttype",
                     "dataschema", "data"],
        "properties": {
            "specversion": {"const": SPECVERSION},
            "id": ident,
            "source": _str("the needle component that recorded it, e.g. 'needle/intake'", format="uri-reference"),
            "type": {"const": model.ce_type},
            "subject": subject,
            "time": {"type": "string", "format": "date-time", "description": "when it was recorded (UTC)"},
            "datacontenttype": {"const": "application/json"},
            "dataschema": _str(f"the $id of this schema: {schema_id(model.ce_type)}", format="uri"),
            "actor": _str("extension: the token subject that caused it"),
            "causationid": _str("extension: the id or stream position of the event or request that caused it"),
            "correlationid": _str("extension: groups events of one flow"),
            **({"sealed": _str("extension: the free text of this event ('[sealed]' in data; a sealed location is "
                               "null), sealed with the issue's data key: '<key id>.<nonce>.<ciphertext>'. needle's "
                               "HTTP reads, event stream and webhooks serve the event opened, without it, or, once "
                               "the key is destroyed, with '[erased]' text",
                               pattern=r"^[0-9a-f]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")}
               if is_sealable(model) else {}),
            "sequence": {"type": "integer", "minimum": 1,
                         "description": "extension: stream sequence (in HTTP reads only, never stored)"},
            "data": data,
        },
    }
    if defs:
        schema["definitions"] = defs
    return schema


@cache
def _all() -> dict[str, dict[str, Any]]:
    return {m.ce_type: envelope_schema(m) for m in EVENT_TYPES}


def all_schemas() -> dict[str, dict[str, Any]]:
    """ce_type -> schema for every current event type (a deep copy: callers may mutate it)."""
    return copy.deepcopy(_all())


def schema_for(ce_type: str) -> dict[str, Any] | None:
    s = _all().get(ce_type)
    return copy.deepcopy(s) if s is not None else None


def dumps(schema: dict[str, Any]) -> str:
    """The canonical text of a schema file (stable, so diffs are meaningful)."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schemas(directory: Path, *, force: bool = False) -> list[Path]:
    """Write ``<type>.json`` for every current type; files of retired types are left alone. Refuses (and
    writes nothing) when an existing file would change incompatibly, unless ``force``."""
    directory.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    for ce_type, schema in sorted(_all().items()):
        path = directory / file_name(ce_type)
        if path.exists() and not force:
            problems += [f"{ce_type}: {p}" for p in breaking_changes(json.loads(path.read_text("utf-8")), schema)]
    if problems:
        raise IncompatibleChange("schemas changed without a version bump (add a new type version):\n  "
                                 + "\n  ".join(problems))
    out = []
    for ce_type, schema in sorted(_all().items()):
        path = directory / file_name(ce_type)
        path.write_text(dumps(schema), encoding="utf-8")
        out.append(path)
    return out


# -- compatibility ---------------------------------------------------------------------------------
ANNOTATIONS = frozenset({"title", "description", "examples", "$comment"})


class IncompatibleChange(ValueError):
    """A published schema would change in a way its readers could notice."""


def breaking_changes(old: Any, new: Any, path: str = "$") -> list[str]:
    """What differs between two versions of a schema, apart from what the policy allows within one
    type version (docs/EVENTS.md): new optional properties, new definitions, changed annotations."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            here = f"{path}.{key}"
            if key in ANNOTATIONS:
                continue
            if key == "definitions" and key not in old:
                continue  # the first definitions of a schema: new definitions are allowed (an optional field's type)
            if key not in new or key not in old:
                out.append(f"{here} {'removed' if key not in new else 'added'}")
            elif key in ("properties", "definitions") and isinstance(old[key], dict) and isinstance(new[key], dict):
                for name in sorted(set(old[key]) | set(new[key])):
                    if name not in new[key]:
                        out.append(f"{here}.{name} removed")
                    elif name in old[key]:
                        out += breaking_changes(old[key][name], new[key][name], f"{here}.{name}")
            elif key == "required" and isinstance(old[key], list) and isinstance(new[key], list):
                if set(old[key]) != set(new[key]):
                    out.append(f"{here}: {sorted(old[key])} -> {sorted(new[key])}")
            else:
                out += breaking_changes(old[key], new[key], here)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return [p for i, (a, b) in pairs for p in breaking_changes(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


# -- AsyncAPI -------------------------------------------------------------------------------------
def _message(model: type[Event], schema_dir: str) -> dict[str, Any]:
    return {
        "name": model.name,
        "title": model.ce_type,
        "summary": (model.__doc__ or model.__name__).strip().splitlines()[0],
        "contentType": "application/json",
        "payload": {"schemaFormat": SCHEMA_FORMAT, "schema": {"$ref": f"{schema_dir}/{file_name(model.ce_type)}"}},
    }


def asyncapi_document(schema_dir: str = "schemas") -> dict[str, Any]:
    """AsyncAPI 3.0 for the NATS subjects and the SSE stream; payloads reference the schema files."""
    issue_models = [m for m in EVENT_TYPES if m not in (RulebookPublished, ResidentForgotten, VisitRecorded)]
    ref = {m.name: {"$ref": f"#/components/messages/{m.name}"} for m in EVENT_TYPES}
    issue_refs = {m.name: ref[m.name] for m in issue_models}
    overflow = {
        "name": "overflow", "title": OVERFLOW_EVENT, "contentType": "application/json",
        "summary": "Last event of a stream whose client read too slowly: reconnect with Last-Event-ID.",
        "payload": {"type": "object", "required": ["last_event_id"],
                    "properties": {"last_event_id": {"type": "string"}, "reason": {"type": "string"}}},
    }
    messages = {m.name: _message(m, schema_dir) for m in EVENT_TYPES} | {"overflow": overflow}

    def op(channel: str, msgs: list[str], summary: str) -> dict[str, Any]:
        return {"action": "receive", "channel": {"$ref": f"#/channels/{channel}"}, "summary": summary,
                "messages": [{"$ref": f"#/channels/{channel}/messages/{n}"} for n in msgs]}

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "needle events",
            "version": "1.0.0",
            "description": "Every fact needle records, as CloudEvents 1.0 JSON on the JetStream stream "
                           f"{sj.EVENTS_STREAM} and on the HTTP Server-Sent Events stream. Compatibility "
                           "policy: docs/EVENTS.md. Generated by `python -m shared.events.schemas`; do not edit.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {"host": "localhost:4222", "protocol": "nats",
                     "description": "JetStream; integrators get a read-only user (subscribe to needle.events.>)"},
            "http": {"host": "localhost:8000", "protocol": "http",
                     "description": "needle's HTTP API; bearer token of role integrator, admin or supervisor"},
        },
        "channels": {
            "issueEvents": {
                "address": f"{sj.EVENTS_ROOT}.issue.{{issueId}}.{{eventName}}",
                "title": "events of one issue",
                "description": "One subject per issue and event type; filter with wildcards, e.g. "
                               f"`{sj.events_of_type('task_dispatched')}`. Ordered per issue by stream sequence.",
                "servers": [{"$ref": "#/servers/nats"}],
                "parameters": {
                    "issueId": {"description": "the issue id (a ULID-like token)"},
                    "eventName": {"enum": [m.name for m in issue_models], "description": "the event name"},
                },
                "messages": issue_refs,
            },
            "rulebookEvents": {
                "address": f"{sj.EVENTS_ROOT}.rulebook.{{version}}.{RulebookPublished.name}",
                "title": "rulebooks taking effect",
                "servers": [{"$ref": "#/servers/nats"}],
                "parameters": {"version": {"description": "the rulebook version (content digest)"}},
                "messages": {RulebookPublished.name: ref[RulebookPublished.name]},
            },
            "residentEvents": {
                "address": f"{sj.EVENTS_ROOT}.resident.{{residentId}}.{ResidentForgotten.name}",
                "title": "residents forgotten (crypto-shredding)",
                "description": "A resident's data key was destroyed: the resident's sealed name and phone in "
                               "earlier issue_reported events can never be read again. No personal data.",
                "servers": [{"$ref": "#/servers/nats"}],
                "parameters": {"residentId": {"description": "the resident id"}},
                "messages": {ResidentForgotten.name: ref[ResidentForgotten.name]},
            },
            "visitEvents": {
                "address": f"{sj.EVENTS_ROOT}.visit.{{visitId}}.{VisitRecorded.name}",
                "title": "household visits (走访) of the grids' service teams",
                "description": "One subject per visit. The household appears only as an HMAC of its key in the "
                               "grid's register (the HMAC key never leaves needle's data directory).",
                "servers": [{"$ref": "#/servers/nats"}],
                "parameters": {"visitId": {"description": "the visit id"}},
                "messages": {VisitRecorded.name: ref[VisitRecorded.name]},
            },
            "eventStream": {
                "address": "/v1/events/stream",
                "title": "Server-Sent Events",
                "description": "GET /v1/events/stream?types=&area= streams the same CloudEvents: SSE `id` = "
                               "stream sequence, `event` = CloudEvents type, `data` = the CloudEvent JSON. "
                               "Resume with the Last-Event-ID header (or ?last_event_id=): no gap, no duplicate. "
                               "A comment line `: ping` every 15 s keeps the connection alive.",
                "servers": [{"$ref": "#/servers/http"}],
                "messages": ref | {"overflow": {"$ref": "#/components/messages/overflow"}},
                "bindings": {"http": {"method": "GET"}},
            },
        },
        "operations": {
            "receiveIssueEvents": op("issueEvents", [m.name for m in issue_models], "Subscribe to issue events."),
            "receiveRulebookEvents": op("rulebookEvents", [RulebookPublished.name], "Rulebooks taking effect."),
            "receiveResidentEvents": op("residentEvents", [ResidentForgotten.name], "Residents forgotten."),
            "receiveVisitEvents": op("visitEvents", [VisitRecorded.name], "Household visits."),
            "receiveEventStream": op("eventStream", [m.name for m in EVENT_TYPES] + ["overflow"],
                                     "Read the SSE stream."),
        },
        "components": {"messages": messages},
    }


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def asyncapi_yaml(schema_dir: str = "schemas") -> str:
    return yaml.dump(asyncapi_document(schema_dir), Dumper=_NoAliases, sort_keys=False, allow_unicode=True,
                     width=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m shared.events.schemas", description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path, help="where to write <type>.json")
    ap.add_argument("--asyncapi", type=Path, help="also write the AsyncAPI document here")
    ap.add_argument("--force", action="store_true", help="overwrite even incompatible changes (never for a "
                                                          "published type: add a new type version instead)")
    args = ap.parse_args(argv)
    try:
        written = write_schemas(args.directory, force=args.force)
    except IncompatibleChange as exc:
        raise SystemExit(str(exc)) from None
    print(f"wrote {len(written)} schemas to {args.directory}")
    if args.asyncapi:
        rel = os.path.relpath(args.directory.resolve(), args.asyncapi.resolve().parent)
        args.asyncapi.write_text(asyncapi_yaml(Path(rel).as_posix()), encoding="utf-8")
        print(f"wrote {args.asyncapi}")


if __name__ == "__main__":
    main()
