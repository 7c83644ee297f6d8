"""Every event the five stages exchange.

Each event is a frozen, keyword-only msgspec Struct tagged by its class name, encoded as msgpack.
Audio is raw PCM s16le mono in ``bytes`` (never base64). Every event carries the session id, a
sequence number (monotonic per session, subject and producing stage; stamped by the publisher) and the
wall-clock time it was produced, in Unix nanoseconds. Events of a user or agent turn carry ``turn``.

Evolution rule: new fields get defaults, existing fields never change type. A breaking change bumps
``SCHEMA_VERSION`` and a session opened under one version is only served by replicas of that version.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

SCHEMA_VERSION = 2

#: Sample rate of user audio after the ingress has normalised it (16 kHz mono, the rate every STT takes).
USER_RATE = 16_000
#: Duration of one audio frame on the bus, user and agent side alike.
FRAME_MS = 20
#: Most 20 ms frames one ``AgentAudio`` event carries (200 ms): enough to cut the message rate on
#: ``audio.out`` tenfold while the TTS runs ahead, small enough that a cut reply wastes little.
AGENT_AUDIO_MAX_FRAMES = 10
#: Most frames one ``UserAudio`` carries (100 ms). Batching cuts the messages on ``audio.in`` (the
#: per-message cost of Python and the server, not the bytes, is what limits calls per host) to a fifth;
#: a partial transcript waits at most 80 ms more for its audio, and the end of speech is never held
#: back: the ingress sends what it holds before every speech start or stop.
USER_AUDIO_MAX_FRAMES = 5
#: Output rates an agent audio stream may use.
AgentRate = Literal[8000, 16000, 22050, 24000, 44100, 48000]
AGENT_RATES: tuple[int, ...] = AgentRate.__args__  # type: ignore[attr-defined]

SessionId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
Stage = Literal["ingress", "stt", "dialogue", "tts", "egress"]
STAGES: tuple[Stage, ...] = ("ingress", "stt", "dialogue", "tts", "egress")
Turn = Annotated[int, Meta(ge=0)]
NonNegative = Annotated[int, Meta(ge=0)]
SampleRate = Annotated[int, Meta(ge=8_000, le=48_000)]
Pcm = Annotated[bytes, Meta(max_length=48_000 * 2)]  # at most one second of mono s16le at 48 kHz
Text = Annotated[str, Meta(max_length=16_384)]


def frame_bytes(sample_rate: int) -> int:
    """Bytes in one ``FRAME_MS`` frame of mono s16le audio at ``sample_rate``."""
    return sample_rate * FRAME_MS // 1000 * 2


#: Bytes of one frame of user audio.
USER_FRAME_BYTES = frame_bytes(USER_RATE)


class Event(msgspec.Struct, tag=True, tag_field="type", kw_only=True, frozen=True):
    """Fields every event carries; ``seq`` and ``ts`` are stamped by the publisher."""

    session: SessionId
    seq: NonNegative = 0
    ts: NonNegative = 0


# --- session lifecycle ------------------------------------------------------------------------------


class AgentSpec(msgspec.Struct, kw_only=True, frozen=True):
    """What the agent is told and how it sounds for one session."""

    instructions: Text = (
        "You are a friendly voice assistant on a phone line. Answer in one or two short sentences."
    )
    greeting: Text = ""
    voice: str = ""


class SessionSpec(msgspec.Struct, kw_only=True, frozen=True):
    """How a session is wired at its edges; stored in the session registry and sent with SessionStarted.

    ``source``/``sink`` name the media edge: ``bus`` (raw PCM on the session's media subjects, used by
    the virtual caller, the replay tool and benchmarks), ``file`` (a WAV path), ``livekit`` (a room),
    ``webrtc`` (a WHIP/WHEP peer of the browser edge).
    """

    session: SessionId
    schema_version: int = SCHEMA_VERSION
    source: Literal["bus", "file", "livekit", "webrtc"] = "bus"
    source_uri: str = ""
    sink: Literal["bus", "file", "livekit", "webrtc"] = "bus"
    sink_uri: str = ""
    output_rate: AgentRate = 24000
    #: Pace of the session's clock: 1.0 is real time; replays and tests may run faster.
    speed: Annotated[float, Meta(gt=0.0, le=64.0)] = 1.0
    language: str = "en"
    agent: AgentSpec = AgentSpec()
    #: Where egress writes the conversation as heard (stereo WAV), if anywhere.
    recording_path: str = ""
    opened_ts: NonNegative = 0


class SessionStarted(Event, kw_only=True, frozen=True):
    """The session exists and every stage has an owner; stages start serving it."""

    spec: SessionSpec


class SessionEnded(Event, kw_only=True, frozen=True):
    """The call is over; every stage releases the session."""

    reason: Literal["hangup", "completed", "max_duration", "inactivity", "error", "operator"] = "hangup"


# --- caller media (edge -> ingress) -----------------------------------------------------------------


class CallerAudio(Event, kw_only=True, frozen=True):
    """Raw caller audio from a media edge, at whatever rate and frame size the edge has."""

    pcm: Pcm
    sample_rate: SampleRate
    channels: Annotated[int, Meta(ge=1, le=2)] = 1
    #: The edge's last chunk of the stream: the ingress flushes what it holds back (resampler delay,
    #: the last partial frame padded with silence).
    last: bool = False

    def __post_init__(self) -> None:
        if len(self.pcm) % (2 * self.channels):
            raise ValueError(f"pcm length {len(self.pcm)} is not whole s16le samples")


# --- user audio and voice activity (ingress -> stt, egress, dialogue) -------------------------------


class UserAudio(Event, kw_only=True, frozen=True):
    """One to five consecutive 20 ms frames (``USER_AUDIO_MAX_FRAMES``) of the caller's 16 kHz audio.

    ``index`` is the stream index of the first frame (frames count from stream start); the frames
    that follow it are ``index + 1``, ``index + 2``, ... ``speech_probs`` holds one VAD probability per
    frame: the probability of the window the frame completed, 0.0 where it completed none.
    """

    index: NonNegative
    pcm: Annotated[
        bytes, Meta(min_length=USER_FRAME_BYTES, max_length=USER_AUDIO_MAX_FRAMES * USER_FRAME_BYTES)
    ]
    sample_rate: Literal[16000] = 16000
    speech_probs: Annotated[
        tuple[Annotated[float, Meta(ge=0.0, le=1.0)], ...],
        Meta(min_length=1, max_length=USER_AUDIO_MAX_FRAMES),
    ]

    def __post_init__(self) -> None:
        frames, rest = divmod(len(self.pcm), USER_FRAME_BYTES)
        if rest or not 1 <= frames <= USER_AUDIO_MAX_FRAMES:
            raise ValueError(
                f"pcm of {len(self.pcm)} bytes is not 1 to {USER_AUDIO_MAX_FRAMES} whole "
                f"{FRAME_MS} ms frames of {USER_FRAME_BYTES} bytes"
            )
        if len(self.speech_probs) != frames:
            raise ValueError(f"{len(self.speech_probs)} speech_probs for {frames} frames (one per frame)")

    @property
    def frames(self) -> int:
        """Number of 20 ms frames carried."""
        return len(self.pcm) // USER_FRAME_BYTES

    @property
    def audio_ms(self) -> int:
        """Stream time at the start of the first frame."""
        return self.index * FRAME_MS

    def each_frame(self) -> Iterator[tuple[int, bytes]]:
        """Each frame's stream index and pcm, in order."""
        for k in range(self.frames):
            yield self.index + k, self.pcm[k * USER_FRAME_BYTES : (k + 1) * USER_FRAME_BYTES]


class SpeechStarted(Event, kw_only=True, frozen=True):
    """The VAD heard the caller start speaking (after its minimum speech duration)."""

    segment: NonNegative
    #: Stream time of the first speech frame.
    start_ms: NonNegative
    #: Index of the last frame published before this event (STT reads the segment from the stream).
    at_frame: NonNegative


class SpeechStopped(Event, kw_only=True, frozen=True):
    """The caller has been silent for the VAD's end-of-speech silence."""

    segment: NonNegative
    start_ms: NonNegative
    #: Stream time at the end of the last speech frame.
    end_ms: NonNegative
    at_frame: NonNegative
    #: Wall-clock time the last speech frame reached the ingress: TTFA is measured from here.
    speech_end_ts: NonNegative


# --- transcripts and turns (stt -> dialogue) --------------------------------------------------------


class Word(msgspec.Struct, kw_only=True, frozen=True, array_like=True):
    """A recognised word with stream times in milliseconds."""

    text: str
    start_ms: NonNegative
    end_ms: NonNegative
    confidence: Annotated[float, Meta(ge=0.0, le=1.0)] = 1.0


class Transcript(Event, kw_only=True, frozen=True):
    """Recognised text of one speech segment: partials replace each other, a final is settled."""

    turn: Turn
    segment: NonNegative
    text: Text
    is_final: bool
    words: tuple[Word, ...] = ()
    confidence: Annotated[float, Meta(ge=0.0, le=1.0)] = 1.0


class UserTurnEnded(Event, kw_only=True, frozen=True):
    """Endpointing decided the caller has finished their turn; ``text`` is the whole turn."""

    turn: Turn
    text: Text
    start_ms: NonNegative
    end_ms: NonNegative
    #: Wall-clock time of the end of the caller's last speech frame (from SpeechStopped).
    speech_end_ts: NonNegative
    #: How long endpointing waited after the VAD stop, and why it stopped waiting.
    endpointing_ms: NonNegative
    reason: Literal["silence", "max_delay", "stt_endpoint"] = "silence"


# --- the agent's reply (dialogue -> tts) ------------------------------------------------------------


class ReplyChunk(Event, kw_only=True, frozen=True):
    """A speakable piece of the agent's reply to ``turn``.

    ``generation`` counts attempts at the same reply (a regenerated reply after a failover or a
    preemptive start gets a new one): later generations supersede earlier ones. ``last`` closes the
    reply. ``kind`` tells TTS and the history apart a reply from a filler or a degraded-service line.
    """

    turn: Turn
    generation: NonNegative = 0
    index: NonNegative
    text: Text
    last: bool = False
    kind: Literal["reply", "filler", "degraded", "greeting"] = "reply"


# --- agent audio (tts -> egress) --------------------------------------------------------------------


class WordTiming(msgspec.Struct, kw_only=True, frozen=True, array_like=True):
    """Where a word of the reply sits in its audio, in ms from the reply's first frame."""

    text: str
    start_ms: NonNegative
    end_ms: NonNegative


class AgentAudioFrame(Event, kw_only=True, frozen=True):
    """One 20 ms frame of the agent's voice at the session's output rate, as the egress plays it.

    Egress publishes one per frame on ``media.out`` as it plays; the TTS sends them in ``AgentAudio``.

    ``words`` rides on the first frame of each reply chunk (an engine that streams its alignment also
    puts some on later ones): the TTS's own alignment where it gives one, else an estimate from the
    text length.
    """

    turn: Turn
    generation: NonNegative = 0
    index: NonNegative
    chunk: NonNegative
    pcm: Pcm
    sample_rate: AgentRate
    words: tuple[WordTiming, ...] = ()

    def __post_init__(self) -> None:
        if len(self.pcm) != frame_bytes(self.sample_rate):
            raise ValueError(f"frame of {len(self.pcm)} bytes at {self.sample_rate} Hz is not {FRAME_MS} ms")


class AgentAudio(Event, kw_only=True, frozen=True):
    """Consecutive 20 ms frames of one reply chunk at the session's output rate, as the TTS sends them.

    ``audio.out`` is the busiest hop of a call; carrying up to ``AGENT_AUDIO_MAX_FRAMES`` frames per
    message divides its per-message cost (client and server) by up to that much. The egress splits
    each event into ``AgentAudioFrame``s and still plays and forwards 20 ms frames. ``index`` is the
    index of the first frame in the generation; ``words`` (the timings of all its frames' words, in ms
    from the reply's first frame) ride on that first frame.
    """

    turn: Turn
    generation: NonNegative = 0
    index: NonNegative
    chunk: NonNegative
    pcm: Pcm
    sample_rate: AgentRate
    words: tuple[WordTiming, ...] = ()

    def __post_init__(self) -> None:
        size = frame_bytes(self.sample_rate)
        if not self.pcm or len(self.pcm) % size:
            raise ValueError(
                f"agent audio of {len(self.pcm)} bytes at {self.sample_rate} Hz is not whole "
                f"{FRAME_MS} ms frames ({size} bytes each)"
            )
        if len(self.pcm) > AGENT_AUDIO_MAX_FRAMES * size:
            raise ValueError(
                f"agent audio of {len(self.pcm) // size} frames exceeds {AGENT_AUDIO_MAX_FRAMES} per event"
            )

    @property
    def frames(self) -> int:
        """How many 20 ms frames this event carries."""
        return len(self.pcm) // frame_bytes(self.sample_rate)

    def split(self) -> list[AgentAudioFrame]:
        """The event as the 20 ms frames egress plays, numbered on from ``index``; words on the first."""
        size = frame_bytes(self.sample_rate)
        return [
            AgentAudioFrame(
                session=self.session,
                seq=self.seq,
                ts=self.ts,
                turn=self.turn,
                generation=self.generation,
                index=self.index + i,
                chunk=self.chunk,
                pcm=self.pcm[i * size : (i + 1) * size],
                sample_rate=self.sample_rate,
                words=self.words if i == 0 else (),
            )
            for i in range(self.frames)
        ]


class AgentAudioEnd(Event, kw_only=True, frozen=True):
    """The reply's audio is complete: ``frames`` 20 ms frames were sent for this generation."""

    turn: Turn
    generation: NonNegative = 0
    frames: NonNegative
    text: Text = ""


# --- playout (egress -> dialogue) -------------------------------------------------------------------


class PlayoutStarted(Event, kw_only=True, frozen=True):
    """The first frame of a reply left the egress."""

    turn: Turn
    generation: NonNegative = 0


class PlayoutPaused(Event, kw_only=True, frozen=True):
    """Egress stopped output because the caller started speaking; it holds the rest of the reply."""

    turn: Turn
    generation: NonNegative = 0
    played_ms: NonNegative


class PlayoutResumed(Event, kw_only=True, frozen=True):
    """A paused reply continues from where it stopped."""

    turn: Turn
    generation: NonNegative = 0
    played_ms: NonNegative


class PlayoutStopped(Event, kw_only=True, frozen=True):
    """A reply is over at the egress: played to the end, or cut off with the rest dropped."""

    turn: Turn
    generation: NonNegative = 0
    played_ms: NonNegative
    #: The reply text the caller heard, from word timings up to ``played_ms``.
    heard_text: Text
    completed: bool
    dropped_frames: NonNegative = 0


# --- control (broadcast to every stage) -------------------------------------------------------------


class Interrupt(Event, kw_only=True, frozen=True):
    """The caller barged in on ``turn``: cancel its generation, synthesis and playout."""

    turn: Turn
    reason: Literal["barge_in", "preempted", "operator"] = "barge_in"


class Resume(Event, kw_only=True, frozen=True):
    """A pause was a false alarm (noise, a backchannel): carry on with ``turn``."""

    turn: Turn
    reason: Literal["no_words", "backchannel"] = "no_words"


class Cancel(Event, kw_only=True, frozen=True):
    """Drop one generation of a reply (a preemptive start whose transcript changed)."""

    turn: Turn
    generation: NonNegative


class ControlAck(Event, kw_only=True, frozen=True):
    """A stage has acted on a control event (identified by its type, turn and seq)."""

    stage: Stage
    replica: str
    acked: Literal["Interrupt", "Resume", "Cancel", "SessionEnded"]
    turn: Turn = 0
    acked_seq: NonNegative = 0
    #: Egress reports how much of the reply had played when it stopped.
    played_ms: NonNegative = 0


# --- observability ----------------------------------------------------------------------------------


class TurnMark(Event, kw_only=True, frozen=True):
    """A point on a turn's timeline, for the per-turn latency table and the benchmark phase split."""

    turn: Turn
    stage: Stage
    mark: Literal[
        "speech_end",
        "vad_stop",
        "stt_told",
        "stt_final",
        "end_of_turn",
        "llm_request",
        "llm_first_token",
        "first_chunk",
        "tts_text",
        "tts_first_audio",
        "first_audio_out",
        "barge_in_speech",
        "barge_in_paused",
        "barge_in_stopped",
    ]
    at_ns: NonNegative


class TurnUsage(Event, kw_only=True, frozen=True):
    """What a stage's provider billed for a turn, and its price from the stage's price table.

    ``amounts`` by kind: ``stt_audio_s`` (audio seconds sent), ``llm_input_tokens``,
    ``llm_output_tokens``, ``llm_cache_read_tokens``, ``llm_cache_write_tokens``, ``tts_chars``.
    """

    turn: Turn
    stage: Stage
    engine: str
    amounts: dict[str, Annotated[float, Meta(ge=0)]] = {}
    cost_usd: Annotated[float, Meta(ge=0)] = 0.0


class ErrorEvent(Event, kw_only=True, frozen=True):
    """A stage could not handle something; it keeps serving the session."""

    stage: Stage
    code: Literal[
        "malformed",
        "oversized",
        "wrong_subject",
        "unknown_session",
        "schema_version",
        "provider",
        "internal",
        "ack_timeout",
    ]
    message: Text
    subject: str = ""
    retryable: bool = False
    turn: int = -1
