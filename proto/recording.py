"""The file format of an exported session: its recorded messages exactly as the bus carried them.

``voicebus record export`` writes one ``Recording`` (msgpack); ``voicebus replay`` feeds its
caller-side audio back through running services and compares what comes out with what it holds.
"""

from __future__ import annotations

import msgspec

from proto.events import NonNegative, SessionId


class RecordedMessage(msgspec.Struct, array_like=True, frozen=True):
    """One message of the events stream: subject, stream sequence, time stored, msgpack payload."""

    subject: str
    stream_seq: int
    time_ns: int
    data: bytes


class RecordedCallerAudio(msgspec.Struct, frozen=True):
    """The part of a caller audio event on ``audio.in`` that every recording has, whatever its age.

    Recordings made before frames were batched hold one ``UserAudioFrame`` per 20 ms frame; later
    ones hold ``UserAudio`` of several. Both are maps with the stream ``index`` of their first frame
    and whole 16 kHz frames in ``pcm``, so reading just these fields replays either.
    """

    index: NonNegative
    pcm: bytes


class Recording(msgspec.Struct, kw_only=True, frozen=True):
    """A session's recorded messages, in stream order."""

    session: SessionId
    schema_version: int
    exported_ts: int
    messages: list[RecordedMessage]
