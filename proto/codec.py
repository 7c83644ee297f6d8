"""msgpack encoding of events and records, with one typed decoder per channel built once.

Decoding checks everything a receiver must not trust: the size, the msgpack, the event type against
the channel it arrived on, every field's type and range, and that the session in the payload is the
session in the subject. Each failure is a ``ContractError`` whose ``code`` goes into the ErrorEvent
the receiving stage publishes; the stage then carries on with the next message.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar, Union

import msgspec

from proto import events as ev
from proto import subjects as sj

ErrorCode = Literal["malformed", "oversized", "wrong_subject", "unknown_session"]
R = TypeVar("R", bound=msgspec.Struct)


class ContractError(ValueError):
    """A message that does not satisfy the contract; ``code`` classifies it for the error event."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code


_encoder = msgspec.msgpack.Encoder()
_any_event = msgspec.msgpack.Decoder(Union[tuple(ev.Event.__subclasses__())])  # noqa: UP007
_channel_decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {
    c.name: msgspec.msgpack.Decoder(Union[c.events] if len(c.events) > 1 else c.events[0])  # noqa: UP007
    for c in sj.CHANNELS
}


def encode(obj: msgspec.Struct) -> bytes:
    """Msgpack bytes of an event or record."""
    return _encoder.encode(obj)


def stamp(event: ev.Event, seq: int, ts: int) -> ev.Event:
    """The event with its sequence number and production time set (events are frozen)."""
    return msgspec.structs.replace(event, seq=seq, ts=ts)


def decode(subject: str, data: bytes) -> ev.Event:
    """Decode a message that arrived on a per-session subject, or raise ContractError."""
    try:
        session, channel = sj.parse(subject)
    except KeyError:
        raise ContractError("wrong_subject", f"{subject!r} is not a voicebus session subject") from None
    if len(data) > channel.max_bytes:
        raise ContractError(
            "oversized", f"{len(data)} bytes on {channel.name} exceeds its limit of {channel.max_bytes}"
        )
    try:
        event: ev.Event = _channel_decoders[channel.name].decode(data)
    except msgspec.ValidationError as e:
        code: ErrorCode = "wrong_subject" if _is_known_event(data) else "malformed"
        raise ContractError(code, f"invalid {channel.name} event: {e}") from None
    except msgspec.DecodeError as e:
        raise ContractError("malformed", f"undecodable {channel.name} payload: {e}") from None
    if event.session != session:
        raise ContractError("unknown_session", f"event for session {event.session!r} arrived on {subject!r}")
    return event


def _is_known_event(data: bytes) -> bool:
    """Whether the payload is a valid event of some type (then the subject was the wrong one)."""
    try:
        _any_event.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return False
    return True


def decode_event(data: bytes) -> ev.Event:
    """Decode any event without a subject (recordings, tests); raises ContractError."""
    try:
        event: ev.Event = _any_event.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ContractError("malformed", f"invalid event: {e}") from None
    return event


def decode_record(kind: type[R], data: bytes) -> R:
    """Decode a system message or stored record of a known type; raises ContractError."""
    try:
        return msgspec.msgpack.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ContractError("malformed", f"invalid {kind.__name__}: {e}") from None
