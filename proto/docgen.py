"""Generate the contract document (AsyncAPI 3.0, JSON) from the code: channels, messages, schemas.

``voicebus proto`` writes ``proto/asyncapi.json``; a test regenerates it and fails when the checked-in
document and the code disagree. Payload schemas are JSON Schema from msgspec; on the wire every
payload is msgpack, with ``bytes`` fields as msgpack bin (raw PCM, never base64).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from proto import events as ev
from proto import state, system
from proto import subjects as sj

DOCUMENT = Path(__file__).with_name("asyncapi.json")


def build() -> dict[str, Any]:
    """The AsyncAPI document as a dict (deterministic: same code, same document)."""
    event_types = sorted(ev.Event.__subclasses__(), key=lambda t: t.__name__)
    system_types = sorted(
        [
            t
            for t in vars(system).values()
            if isinstance(t, type) and issubclass(t, system.SystemMessage) and t is not system.SystemMessage
        ],
        key=lambda t: t.__name__,
    )
    state_types = sorted(state.StageState.__subclasses__(), key=lambda t: t.__name__)
    _, components = msgspec.json.schema_components(
        [*event_types, *system_types, *state_types], ref_template="#/components/schemas/{name}"
    )
    for t in [*event_types, *system_types, *state_types]:
        _bytes_as_msgpack_bin(t, components[t.__name__])
    messages = {
        t.__name__: {
            "name": t.__name__,
            "title": t.__name__,
            "summary": (t.__doc__ or "").strip().splitlines()[0],
            "contentType": "application/msgpack",
            "payload": {"$ref": f"#/components/schemas/{t.__name__}"},
        }
        for t in [*event_types, *system_types]
    }
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for c in sj.CHANNELS:
        key = c.name.replace(".", "_")
        channels[key] = {
            "address": f"{sj.PREFIX}.{{session}}.{c.name}",
            "description": c.description,
            "parameters": {"session": {"description": "Session id: [A-Za-z0-9][A-Za-z0-9_-]{0,63}"}},
            "messages": {t.__name__: {"$ref": f"#/components/messages/{t.__name__}"} for t in c.events},
            "x-voicebus": {
                "producers": list(c.producers),
                "consumers": list(c.consumers),
                "recorded": c.recorded,
                "max_bytes": c.max_bytes,
                "delivery": "acked by the events stream" if c.acked else "fire-and-forget",
            },
        }
        operations[f"publish_{key}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{key}"},
            "x-producers": list(c.producers),
        }
    for s in sj.SYSTEM_SUBJECTS:
        key = f"sys_{s.name}"
        msgs = [s.request, *([s.reply] if s.reply else [])]
        parameters: dict[str, Any] = {"stage": {"enum": list(s.stages)}}
        if s.per_session:
            parameters["session"] = {"description": "Session id: [A-Za-z0-9][A-Za-z0-9_-]{0,63}"}
        channels[key] = {
            "address": s.address,
            "description": s.description,
            "parameters": parameters,
            "messages": {t.__name__: {"$ref": f"#/components/messages/{t.__name__}"} for t in msgs},
        }
        operations[f"request_{s.name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [{"$ref": f"#/channels/{key}/messages/{s.request.__name__}"}],
            **(
                {"reply": {"messages": [{"$ref": f"#/channels/{key}/messages/{s.reply.__name__}"}]}}
                if s.reply
                else {}
            ),
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "voicebus events",
            "version": f"{ev.SCHEMA_VERSION}.0.0",
            "description": (ev.__doc__ or "").strip(),
        },
        "defaultContentType": "application/msgpack",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": components},
        "x-voicebus-storage": {
            "events_stream": {"name": sj.EVENTS_STREAM, "subjects": sj.recorded_patterns()},
            "kv_buckets": {
                sj.SESSIONS_BUCKET: "session id -> SessionSpec",
                sj.OWNERS_BUCKET: "<stage>.<session> -> OwnerRecord",
                sj.REPLICAS_BUCKET: "<stage>.<replica> -> ReplicaLease (heartbeats)",
                sj.STATE_BUCKET: "<stage>.<session> -> Checkpoint (state: one of "
                + ", ".join(t.__name__ for t in state_types)
                + ")",
            },
        },
    }


def _bytes_as_msgpack_bin(kind: type[msgspec.Struct], schema: dict[str, Any]) -> None:
    """JSON Schema would describe ``bytes`` as base64 text; on the wire they are msgpack bin."""
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    for f in info.fields:
        if isinstance(f.type, msgspec.inspect.BytesType):
            prop: dict[str, Any] = {
                "type": "string",
                "format": "binary",
                "description": "msgpack bin: raw bytes (PCM s16le mono for audio), never base64",
            }
            if f.type.min_length is not None:
                prop["minLength"] = f.type.min_length
            if f.type.max_length is not None:
                prop["maxLength"] = f.type.max_length
            schema["properties"][f.encode_name] = prop


def render() -> str:
    """The document as checked in: sorted keys, two-space indent, trailing newline."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"
