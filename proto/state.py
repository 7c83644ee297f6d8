"""State a stage keeps for a session on the bus, so that a peer can take the session over.

Each stage's record subclasses ``StageState``; it is stored (msgpack) inside the stage's
``Checkpoint`` in the state bucket. Same evolution rules as events: new fields get defaults.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class StageState(msgspec.Struct, kw_only=True):
    """Base of the per-stage session state records."""


class ReplyPosition(msgspec.Struct, kw_only=True):
    """How far a reply had played: frames below ``next_index`` were played (or skipped as lost)."""

    turn: int
    generation: int = 0
    next_index: int = 0
    played: int = 0


class EgressState(StageState, kw_only=True):
    """Egress's playout of a session, so that a successor neither replays nor loses audio.

    ``audio_out_seq`` and ``caller_seq`` are the stream sequences the successor re-reads ``audio.out``
    and ``audio.in`` after: the frames of replies not yet over (queued in memory, never played) and
    caller audio not yet written to the recording.
    """

    #: Replies of turns below ``floor`` are stale (a newer turn's reply has started playing).
    floor: int = 0
    #: Replies of turns up to ``cut`` were interrupted.
    cut: int = -1
    #: Replies that are over (played out, cancelled, superseded): (turn, generation, played_ms).
    closed: list[tuple[int, int, int]] = []
    #: The newest generation seen of each turn: (turn, generation).
    generations: list[tuple[int, int]] = []
    #: The reply that was playing.
    current: ReplyPosition | None = None
    audio_out_seq: int = 0
    caller_seq: int = 0


class DialogueMessage(msgspec.Struct, kw_only=True):
    """One message of the conversation: what the caller said, or what the caller heard of a reply."""

    role: Literal["user", "assistant"]
    turn: int
    text: str
    #: The reply was cut off: ``text`` is the part the caller heard.
    interrupted: bool = False
    #: Generation of the reply the caller heard (a regenerated reply replaces an earlier one).
    generation: int = 0


class SentReply(msgspec.Struct, kw_only=True):
    """A reply sent to TTS whose playout has not been reported yet (its text enters the history then)."""

    turn: int
    generation: int
    text: str
    #: Generated to the end (else cancelled part-way; only the heard text can enter the history).
    complete: bool


class DialogueState(StageState, kw_only=True):
    """The conversation and where its replies stand.

    ``last_turn`` is the latest turn a reply was asked for (0: the greeting) and ``generation`` the
    generation of that reply; ``answered_turn`` the latest turn whose reply needs no more generating
    (it went out to the end, or a Cancel or Interrupt stopped it). A successor that finds
    ``last_turn > answered_turn`` regenerates that reply with the next generation.
    """

    history: list[DialogueMessage] = []
    last_turn: int = -1
    generation: int = 0
    answered_turn: int = -1
    unplayed: list[SentReply] = []


class SttState(StageState, kw_only=True):
    """What stt keeps between turns; checkpointed when a turn ends, while no turn is open.

    A successor resumes reading audio right after that point, so it re-transcribes a turn that was in
    progress from the audio on the bus, under the same turn id.
    """

    #: Id of the last turn that ended (a noise turn included): the next turn is ``last_turn + 1``.
    last_turn: int = 0
    #: Index of the last audio frame handled: frames re-published by a successor ingress are skipped.
    last_frame: int = -1
    #: The last VAD segment handled: its re-published SpeechStarted/SpeechStopped are skipped.
    last_segment: int = -1


class TtsReply(msgspec.Struct, kw_only=True):
    """A reply tts had not finished speaking: the chunks received so far, by index."""

    turn: int
    generation: int
    chunks: dict[int, str] = {}
    #: Index of the chunk marked ``last``, once it has arrived.
    last: int | None = None


class TtsState(StageState, kw_only=True):
    """What a tts successor needs: replies to speak again from their first frame, and what is closed.

    A successor re-synthesises every reply in ``replies`` with the same frame indices (egress drops the
    frames it already has). ``closed`` maps a turn to its highest generation that is finished,
    cancelled or superseded, so late or repeated chunks of those generations are dropped.
    """

    replies: list[TtsReply] = []
    closed: dict[int, int] = {}


# --- ingress ----------------------------------------------------------------------------------------


class SpeechState(msgspec.Struct, kw_only=True):
    """The VAD's segmentation of the caller's stream, counted in 32 ms VAD windows from stream start."""

    #: Windows classified so far.
    window: int = 0
    #: Speech segments started so far; the open one (if any) is ``segments - 1``.
    segments: int = 0
    in_speech: bool = False
    #: First window of the open segment, or of the speech run that may start the next one.
    start_window: int = 0
    #: Window after the open segment's last speech window (its end).
    silence_from: int = 0
    #: Length of the run toward the next decision: speech windows before a start, silent ones before a stop.
    run: int = 0


class SourcePosition(msgspec.Struct, kw_only=True):
    """Where a seekable caller source (a file) is: frames delivered, and when its schedule started."""

    frame: int = 0
    #: Wall-clock time (Unix ns) of frame 0 on the source's pacing schedule.
    t0_ns: int = 0


class IngressState(StageState, kw_only=True):
    """Where the ingress is in a session's caller stream, so a successor goes on with the same frames."""

    #: Index of the next caller frame (the first frame of the next UserAudio).
    next_frame: int = 0
    speech: SpeechState = msgspec.field(default_factory=SpeechState)
    #: Wall-clock time the last speech frame of the open segment reached the ingress.
    speech_end_ts: int = 0
    #: 16 kHz s16le samples received but not yet a whole frame.
    pending_pcm: bytes = b""
    #: Samples of the VAD window in progress (s16le), and the model's recurrent state and context (float32).
    vad_pcm: bytes = b""
    vad_state: bytes = b""
    source: SourcePosition = msgspec.field(default_factory=SourcePosition)
