"""The subject catalogue: every NATS subject, KV bucket and stream the system uses, and who may use it.

Per-session subjects come in two shapes:

- ``vb.<session>.<channel>``: conversation events (speech, transcripts, turns, replies, playout,
  control, timing, errors). Low rate. A stage follows the channels it consumes, in stream order, with
  one consumer filtered on their subjects (``feed``); the edge follows all of them on
  ``vb.<session>.*``.
- ``vb.<session>.audio.in|out`` and ``vb.<session>.media.in|out``: audio, 50 frames a second. A stage
  consumes only the audio subject it needs.

Most events are stored before their publisher goes on (it waits for the stream's ack); timing marks,
telemetry for the edge that nothing in the conversation waits on, are sent without waiting, like audio.

VAD events are published twice: in-band on ``audio.in`` (STT needs them ordered with the frames) and on
``speech`` (egress and dialogue react to them without taking the audio).
"""

from __future__ import annotations

from dataclasses import dataclass

from proto import events as ev
from proto import system

PREFIX = "vb"
SYSTEM_PREFIX = "vbsys"

#: JetStream stream that records every session's events (all but the paced copy on media.out).
EVENTS_STREAM = "VB_EVENTS"
#: KV buckets: open sessions, per-stage owners, replica leases, per-stage session state.
SESSIONS_BUCKET = "vb_sessions"
OWNERS_BUCKET = "vb_owners"
REPLICAS_BUCKET = "vb_replicas"
STATE_BUCKET = "vb_state"

EDGE = "edge"
"""Producer name for whatever opens sessions and feeds caller media: gateway, virtual caller, replay."""


@dataclass(frozen=True, slots=True)
class Channel:
    """One per-session subject: what travels on it, who produces and who consumes it."""

    name: str
    events: tuple[type[ev.Event], ...]
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    description: str
    recorded: bool = True
    #: Whether a publisher waits for the stream to have stored the event (not for audio or marks).
    acked: bool = True
    max_bytes: int = 128 * 1024

    def subject(self, session: str) -> str:
        """The subject of this channel for one session."""
        return f"{PREFIX}.{session}.{self.name}"

    @property
    def pattern(self) -> str:
        """The subject with a wildcard for the session, as used in permissions and the stream."""
        return f"{PREFIX}.*.{self.name}"

    @property
    def is_media(self) -> bool:
        """Media channels have two tokens after the session; conversation channels have one."""
        return "." in self.name


_ALL_STAGES = ev.STAGES

MEDIA_IN = Channel(
    "media.in",
    (ev.CallerAudio,),
    producers=(EDGE,),
    consumers=("ingress",),
    description="Raw caller audio from a media edge (virtual caller, replay, bus-attached gateway).",
    max_bytes=100_000,
    acked=False,
)
MEDIA_OUT = Channel(
    "media.out",
    (ev.AgentAudioFrame,),
    producers=("egress",),
    consumers=(EDGE,),
    description="The agent's audio as egress plays it out, paced in real time, for a bus-attached edge.",
    recorded=False,
    max_bytes=100_000,
    acked=False,
)
AUDIO_IN = Channel(
    "audio.in",
    (ev.UserAudio, ev.SpeechStarted, ev.SpeechStopped),
    producers=("ingress",),
    consumers=("stt",),
    description=(
        f"Caller audio at 16 kHz, up to {ev.USER_AUDIO_MAX_FRAMES} consecutive {ev.FRAME_MS} ms frames "
        "per event, with the VAD's speech events in-band (each right after the frame it names)."
    ),
    max_bytes=4_096,  # a full UserAudio with the longest session id and largest numbers: 3411 bytes
    acked=False,
)
AUDIO_OUT = Channel(
    "audio.out",
    (ev.AgentAudio, ev.AgentAudioEnd),
    producers=("tts",),
    consumers=("egress",),
    description="The agent's synthesised voice at the session's output rate, up to "
    f"{ev.AGENT_AUDIO_MAX_FRAMES} frames of {ev.FRAME_MS} ms per message.",
    max_bytes=100_000,
    acked=False,
)
SPEECH = Channel(
    "speech",
    (ev.SpeechStarted, ev.SpeechStopped),
    producers=("ingress",),
    consumers=("egress", "dialogue", "ingress"),
    description="Voice activity of the caller: egress pauses on it, dialogue decides barge-ins, the "
    "ingress counts it as activity (the call's inactivity limit).",
)
TRANSCRIPT = Channel(
    "transcript",
    (ev.Transcript,),
    producers=("stt",),
    consumers=("dialogue", "egress"),
    description="Partial and final transcripts of the caller's speech segments (the egress captions "
    "them in a LiveKit room).",
)
TURN = Channel(
    "turn",
    (ev.UserTurnEnded,),
    producers=("stt",),
    consumers=("dialogue", "ingress", "egress"),
    description="End of the caller's turn, with the whole turn's text (in a LiveKit room the egress "
    "shows the agent thinking).",
)
REPLY = Channel(
    "reply",
    (ev.ReplyChunk,),
    producers=("dialogue",),
    consumers=("tts",),
    description="The agent's reply in speakable chunks, streamed as the LLM writes it.",
)
PLAYOUT = Channel(
    "playout",
    (ev.PlayoutStarted, ev.PlayoutPaused, ev.PlayoutResumed, ev.PlayoutStopped),
    producers=("egress",),
    consumers=("dialogue", "ingress", "egress"),
    description="What the caller actually heard of each reply, and when (the ingress counts it as "
    "activity, and a WebRTC source opens its echo guard on it; in a LiveKit room the egress shows the "
    "agent's state and closes its captions by it).",
)
CONTROL = Channel(
    "control",
    (ev.SessionStarted, ev.SessionEnded, ev.Interrupt, ev.Resume, ev.Cancel, ev.ControlAck),
    producers=(EDGE, *_ALL_STAGES),
    consumers=_ALL_STAGES,
    description="Session lifecycle and interruption commands, broadcast to every stage, and their acks.",
)
TIMING = Channel(
    "timing",
    (ev.TurnMark, ev.TurnUsage),
    producers=_ALL_STAGES,
    consumers=(EDGE,),
    description="Points on each turn's timeline (per-turn latency table, benchmark phase split) and "
    "what each turn's providers billed.",
    acked=False,
)
ERROR = Channel(
    "error",
    (ev.ErrorEvent,),
    producers=_ALL_STAGES,
    consumers=(EDGE,),
    description="Errors a stage met while serving the session (bad input, provider failures).",
)

CHANNELS: tuple[Channel, ...] = (
    MEDIA_IN,
    MEDIA_OUT,
    AUDIO_IN,
    AUDIO_OUT,
    SPEECH,
    TRANSCRIPT,
    TURN,
    REPLY,
    PLAYOUT,
    CONTROL,
    TIMING,
    ERROR,
)
BY_NAME: dict[str, Channel] = {c.name: c for c in CHANNELS}


def conversation(session: str) -> str:
    """All conversation channels of a session (one consumer, stream order)."""
    return f"{PREFIX}.{session}.*"


def feed(session: str, stage: str) -> list[str]:
    """The conversation subjects of a session that ``stage`` consumes (one filtered consumer)."""
    return [c.subject(session) for c in CHANNELS if not c.is_media and stage in c.consumers]


def session_all(session: str) -> str:
    """Every subject of a session, media included."""
    return f"{PREFIX}.{session}.>"


def recorded_patterns() -> list[str]:
    """Subjects the events stream records.

    Every conversation channel, as one wildcard (a consumer on ``vb.<session>.*`` must be a subset of a
    single stream subject), and the media channels with ``recorded`` set.
    """
    assert all(c.recorded for c in CHANNELS if not c.is_media)
    return [f"{PREFIX}.*.*", *(c.pattern for c in CHANNELS if c.is_media and c.recorded)]


def parse(subject: str) -> tuple[str, Channel]:
    """Split a per-session subject into session id and channel; KeyError if it is not one."""
    parts = subject.split(".", 2)
    if len(parts) != 3 or parts[0] != PREFIX:
        raise KeyError(subject)
    return parts[1], BY_NAME[parts[2]]


@dataclass(frozen=True, slots=True)
class SystemSubject:
    """A subject outside any session: request/reply between the session opener and stage replicas."""

    name: str
    request: type[system.SystemMessage]
    reply: type[system.SystemMessage] | None
    description: str
    #: One subject per (stage, session), answered by the replica that owns the session in that stage.
    per_session: bool = False
    #: The stages whose replicas answer it.
    stages: tuple[str, ...] = ev.STAGES

    def subject(self, stage: str) -> str:
        """The subject for one stage's replicas."""
        assert not self.per_session, f"{self.name} subjects are per session"
        return f"{SYSTEM_PREFIX}.{self.name}.{stage}"

    def session_subject(self, stage: str, session: str) -> str:
        """The subject for the replica of ``stage`` that owns ``session``."""
        assert self.per_session, f"{self.name} subjects are per stage"
        return f"{SYSTEM_PREFIX}.{self.name}.{stage}.{session}"

    def pattern(self, stage: str) -> str:
        """Every subject of this kind for ``stage`` (``*``: any stage), as used in permissions."""
        tail = ".*" if self.per_session else ""
        return f"{SYSTEM_PREFIX}.{self.name}.{stage}{tail}"

    @property
    def address(self) -> str:
        """The subject with its parameters, for the contract document."""
        tail = ".{session}" if self.per_session else ""
        return f"{SYSTEM_PREFIX}.{self.name}.{{stage}}{tail}"


CLAIM = SystemSubject(
    "claim",
    system.ClaimRequest,
    system.ClaimReply,
    "Ask one replica of a stage (queue group = stage) to take ownership of a new session.",
)
SIGNAL = SystemSubject(
    "signal",
    system.SdpOffer,
    system.SdpAnswer,
    "Relay a WebRTC peer's SDP offer (WHIP to ingress, WHEP to egress) to the replica that owns the "
    "session in that stage; it answers with its SDP answer.",
    per_session=True,
    stages=("ingress", "egress"),
)
SYSTEM_SUBJECTS: tuple[SystemSubject, ...] = (CLAIM, SIGNAL)


def owner_key(stage: str, session: str) -> str:
    """Key of a session's owner record in the owners bucket."""
    return f"{stage}.{session}"


def replica_key(stage: str, replica: str) -> str:
    """Key of a replica's lease in the replicas bucket."""
    return f"{stage}.{replica}"


def state_key(stage: str, session: str) -> str:
    """Key of a stage's saved state for a session in the state bucket."""
    return f"{stage}.{session}"


def kv_stream(bucket: str) -> str:
    """The JetStream stream behind a KV bucket (NATS convention)."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    """The subject a KV bucket stores ``key`` under (NATS convention; ``key`` may hold wildcards)."""
    return f"$KV.{bucket}.{key}"


def queue_group(stage: str) -> str:
    """The queue group a stage's replicas share for claims."""
    return f"vb-{stage}"
