"""Which room a session is in, and who in it is the caller.

A session names its room in ``spec.source_uri`` (and ``spec.sink_uri``): the room's name, optionally
with the caller's identity as ``<room>?participant=<identity>``. Without one, the caller is the first
participant that is a person (not an agent, not one of the bridge's own) with a microphone.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote

from livekit import rtc

from services.livekit.config import LiveKitConfig

AUDIO = rtc.TrackKind.KIND_AUDIO
MICROPHONE = rtc.TrackSource.SOURCE_MICROPHONE


class BadRoomUri(ValueError):
    """A session's room URI that names no room."""


@dataclass(frozen=True, slots=True)
class RoomTarget:
    """A session's room and, if the session names one, its caller."""

    room: str
    participant: str = ""

    @classmethod
    def parse(cls, uri: str) -> RoomTarget:
        """``<room>`` or ``<room>?participant=<identity>``."""
        room, _, query = uri.partition("?")
        if not room:
            raise BadRoomUri("the session names no LiveKit room (source_uri/sink_uri)")
        participant = parse_qs(query).get("participant", [""])[0]
        return cls(room, participant)

    def uri(self) -> str:
        """The URI that parses back to this target."""
        return f"{self.room}?participant={quote(self.participant)}" if self.participant else self.room

    def is_caller(self, cfg: LiveKitConfig, participant: rtc.RemoteParticipant) -> bool:
        """Whether ``participant`` is the one this session serves."""
        if self.participant:
            return participant.identity == self.participant
        return participant.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT and not cfg.ours(
            participant.identity
        )

    def caller(self, cfg: LiveKitConfig, room: rtc.Room) -> tuple[rtc.RemoteParticipant, str] | None:
        """The caller in ``room`` and the sid of their microphone track ("" if none is published).

        Of several candidates, one that has a microphone is preferred: that is the one being heard.
        """
        found: tuple[rtc.RemoteParticipant, str] | None = None
        for participant in room.remote_participants.values():
            if not self.is_caller(cfg, participant):
                continue
            mic = next((p.sid for p in participant.track_publications.values() if is_voice(p)), "")
            if mic:
                return participant, mic
            found = found or (participant, "")
        return found


def is_voice(publication: rtc.TrackPublication) -> bool:
    """An audio track from a microphone (or of unknown source, as some SIP and server clients send)."""
    return publication.kind == AUDIO and publication.source in (MICROPHONE, rtc.TrackSource.SOURCE_UNKNOWN)
