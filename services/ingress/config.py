"""Settings of the ingress: the VAD model and its decision rule, resampling, file playback, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.livekit.config import LiveKitConfig
from services.runtime.config import ConfigError, setting, settings_class
from services.webrtc.config import WebRtcConfig

RESAMPLE_QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")


@settings_class
@dataclass(frozen=True, kw_only=True)
class IngressConfig:
    """How the ingress turns caller audio into frames and speech segments."""

    vad_model: str = setting(
        "VB_INGRESS_VAD_MODEL",
        "",
        "Silero VAD ONNX file (Silero's export: input, state, sr); default: the 16 kHz one inside the "
        "silero-vad package.",
    )
    vad_gather_ms: float = setting(
        "VB_INGRESS_VAD_GATHER_MS",
        20.0,
        "How long the VAD gathers windows of different calls into one inference (0: each at once). "
        "Windows near a possible speech start or stop, a lone call's and audio that is behind never wait.",
    )
    threshold: float = setting(
        "VB_INGRESS_VAD_THRESHOLD", 0.5, "Speech probability at or above which a VAD window is speech."
    )
    hysteresis: float = setting(
        "VB_INGRESS_VAD_HYSTERESIS",
        0.15,
        "Once the caller speaks, a window counts as silence only below the threshold minus this.",
    )
    min_speech_ms: int = setting(
        "VB_INGRESS_MIN_SPEECH_MS",
        96,
        "Speech that starts a segment (in 32 ms VAD windows, rounded to the nearest; at least one).",
    )
    min_silence_ms: int = setting(
        "VB_INGRESS_MIN_SILENCE_MS",
        200,
        "Silence that ends a segment (in 32 ms VAD windows, rounded to the nearest: 200 ms is 6 windows).",
    )
    resample_quality: str = setting(
        "VB_INGRESS_RESAMPLE_QUALITY",
        "LQ",
        "soxr quality for caller audio not at 16 kHz (QQ, LQ, MQ, HQ, VHQ). LQ rejects aliases by "
        "86 dB and holds back ~11 ms at 48 kHz; HQ holds back ~21 ms (64 ms from 8 kHz).",
    )
    file_tail_s: float = setting(
        "VB_INGRESS_FILE_TAIL",
        15.0,
        "Seconds of silence fed after a file source ends (the last reply plays) before the session ends.",
    )
    max_duration_s: float = setting(
        "VB_SESSION_MAX_DURATION",
        3600.0,
        "Seconds after its opening at which a call is ended (SessionEnded max_duration; 0: no limit).",
    )
    inactivity_s: float = setting(
        "VB_SESSION_INACTIVITY",
        120.0,
        "Seconds without caller speech or agent playout after which a call is ended "
        "(SessionEnded inactivity; 0: never).",
    )
    checkpoint_s: float = setting(
        "VB_INGRESS_CHECKPOINT_INTERVAL",
        1.0,
        "Seconds between checkpoints of a session's stream (also taken at every speech start and stop).",
    )

    #: Settings of the WebRTC source (their own VB_WEBRTC_* table), loaded with these in ``main``.
    webrtc: WebRtcConfig = field(default_factory=WebRtcConfig)

    #: Settings of the LiveKit source (their own LIVEKIT_* / VB_LIVEKIT_* table), loaded in ``main``.
    livekit: LiveKitConfig = field(default_factory=LiveKitConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError("VB_INGRESS_VAD_THRESHOLD must be in (0, 1]")
        if not 0.0 <= self.hysteresis < self.threshold:
            raise ConfigError("VB_INGRESS_VAD_HYSTERESIS must be at least 0 and below the threshold")
        if self.min_speech_ms <= 0 or self.min_silence_ms <= 0:
            raise ConfigError("VB_INGRESS_MIN_SPEECH_MS and VB_INGRESS_MIN_SILENCE_MS must be positive")
        if not 0.0 <= self.vad_gather_ms <= 100.0:
            raise ConfigError("VB_INGRESS_VAD_GATHER_MS must be in [0, 100]")
        if self.resample_quality not in RESAMPLE_QUALITIES:
            raise ConfigError(f"VB_INGRESS_RESAMPLE_QUALITY must be one of {', '.join(RESAMPLE_QUALITIES)}")
        if self.file_tail_s < 0 or self.checkpoint_s <= 0:
            raise ConfigError("VB_INGRESS_FILE_TAIL must be >= 0 and VB_INGRESS_CHECKPOINT_INTERVAL > 0")

    @property
    def neg_threshold(self) -> float:
        """Below this, a window during speech is silence."""
        return self.threshold - self.hysteresis
