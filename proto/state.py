"""State a stage keeps for a session on the bus, so that a peer can take the session over.

Each stage's record subclasses ``StageState``; it is stored (msgpack) inside the stage's
``Checkpoint`` in the state bucket. Same evolution rules as events: new fields get defaults.
"""

from __future__ import annotations

import msgspec


class StageState(msgspec.Struct, kw_only=True):
    """Base of the per-stage session state records."""


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

    #: Index of the next UserAudioFrame.
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
