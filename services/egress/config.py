"""Settings of the egress stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.livekit.config import LiveKitConfig
from services.runtime.config import ConfigError, setting, settings_class
from services.webrtc.config import WebRtcConfig


@settings_class
@dataclass(frozen=True, kw_only=True)
class EgressConfig:
    """Playout pacing, its watchdog, and how often playout is made durable."""

    max_late_ms: float = setting(
        "VB_EGRESS_MAX_LATE_MS",
        60.0,
        "A frame this late (ms of session time; the loop stalled) restarts the playout schedule at now "
        "instead of bursting to catch up.",
    )
    pacing_tick_ms: float = setting(
        "VB_EGRESS_PACING_TICK_MS",
        10.0,
        "Frames of all the replica's sessions that fall due within one tick go out together, each up to "
        "this late (ms of session time; 0: every frame on its own timer). Fewer wake-ups and socket "
        "writes under load; a reply's first frame never waits for it.",
    )
    stall_s: float = setting(
        "VB_EGRESS_STALL_S",
        5.0,
        "Seconds a reply may go without frames before it is given up (PlayoutStopped, not completed).",
    )
    checkpoint_s: float = setting(
        "VB_EGRESS_CHECKPOINT_S",
        0.5,
        "Seconds between checkpoints of the playout position and writes of the WAV sink and recording.",
    )
    pause_on_speech: bool = setting(
        "VB_EGRESS_PAUSE_ON_SPEECH",
        True,
        "Pause the agent's reply the moment the caller starts speaking over it (the VAD's SpeechStarted, "
        "after VB_INGRESS_MIN_SPEECH_MS of speech); the dialogue then interrupts or resumes it.",
    )
    pause_max_s: float = setting(
        "VB_EGRESS_PAUSE_MAX_S",
        5.0,
        "Longest pause without the dialogue's Interrupt or Resume; then playout resumes on its own "
        "(a reply is never left held by a decision that does not come).",
    )
    report_wait_ms: float = setting(
        "VB_EGRESS_REPORT_WAIT_MS",
        100.0,
        "How long a reply's first frame waits for PlayoutStarted to be stored before it plays anyway.",
    )

    #: Settings of the WebRTC sink (their own VB_WEBRTC_* table), loaded with these in ``main``.
    webrtc: WebRtcConfig = field(default_factory=WebRtcConfig)

    #: Settings of the LiveKit sink (their own LIVEKIT_* / VB_LIVEKIT_* table), loaded in ``main``.
    livekit: LiveKitConfig = field(default_factory=LiveKitConfig)

    def __post_init__(self) -> None:
        if (
            self.max_late_ms <= 0
            or self.pacing_tick_ms < 0
            or self.stall_s <= 0
            or self.checkpoint_s <= 0
            or self.report_wait_ms < 0
            or self.pause_max_s <= 0
        ):
            raise ConfigError("VB_EGRESS_* durations must be positive")
