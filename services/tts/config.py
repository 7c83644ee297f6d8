"""Settings of the tts stage (environment variables, read once in ``main``)."""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.config import ConfigError, setting, settings_class

RESAMPLE_QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")


@settings_class
@dataclass(frozen=True, kw_only=True)
class TtsConfig:
    """Which engine speaks, what takes over when it fails, and how audio is resampled."""

    engine: str = setting(
        "VB_TTS_ENGINE",
        "auto",
        "TTS engine: elevenlabs, piper (local neural voice), flite, bench (fixed latency); auto: "
        "elevenlabs when ELEVENLABS_API_KEY is set, else piper.",
    )
    fallback: str = setting(
        "VB_TTS_FALLBACK",
        "auto",
        "Engines that take over, in order, when the one speaking fails (comma-separated; none: no "
        "fallback); auto: the local engines after the primary in elevenlabs, piper, flite.",
    )
    stall_s: float = setting(
        "VB_TTS_STALL_TIMEOUT",
        5.0,
        "Seconds a local engine may take for one chunk before the next engine takes over.",
    )
    resample_quality: str = setting(
        "VB_TTS_RESAMPLE_QUALITY", "HQ", "soxr quality of the resampling to the session's rate (QQ..VHQ)."
    )
    piper_voice: str = setting(
        "VB_TTS_PIPER_VOICE",
        "",
        "Piper .onnx voice (its .onnx.json beside it); default: the packaged en_US-joe-medium voice.",
    )
    piper_workers: int = setting(
        "VB_TTS_PIPER_WORKERS", 2, "Piper syntheses that may run at once per process."
    )
    piper_threads: int = setting("VB_TTS_PIPER_THREADS", 1, "onnxruntime threads of one piper synthesis.")
    flite_voice: str = setting(
        "VB_TTS_FLITE_VOICE", "slt", "flite voice: built-in (slt, rms, awb, kal16) or a .flitevox file."
    )
    bench_speed: float = setting(
        "VB_TTS_BENCH_SPEED", 1.0, "Pace of the bench engine's frames relative to real time (4: barge-in)."
    )

    def __post_init__(self) -> None:
        if self.resample_quality not in RESAMPLE_QUALITIES:
            raise ConfigError(f"VB_TTS_RESAMPLE_QUALITY={self.resample_quality!r}: use {RESAMPLE_QUALITIES}")
        if min(self.stall_s, self.bench_speed, self.piper_workers, self.piper_threads) <= 0:
            raise ConfigError(
                "VB_TTS_STALL_TIMEOUT, _BENCH_SPEED, _PIPER_WORKERS and _PIPER_THREADS must be > 0"
            )
