"""stt engines: the interface (base.py), one module per engine, and the choice by ``VB_STT_ENGINE``.

Engine modules are imported only when chosen: a bench replica never loads CTranslate2.
"""

from __future__ import annotations

from collections.abc import Callable

from services.runtime.config import ConfigError
from services.stt.config import SttConfig
from services.stt.engines.base import SttEngine


def _whisper(cfg: SttConfig) -> SttEngine:
    from services.stt.engines.whisper import WhisperEngine, WhisperOptions

    return WhisperEngine(
        WhisperOptions(
            model_path=cfg.whisper_model,
            cpu_threads=cfg.whisper_threads,
            beam_size=cfg.whisper_beam,
            word_timings=cfg.whisper_words,
            preroll_s=cfg.preroll_s,
            partial_interval_s=cfg.partial_interval_s,
        )
    )


def _bench(cfg: SttConfig) -> SttEngine:
    from services.stt.engines.bench import BenchEngine

    return BenchEngine(text=cfg.bench_text, delay_s=cfg.bench_delay_s)


#: Engine name -> factory; a factory loads what the engine needs (the model) before it returns.
ENGINES: dict[str, Callable[[SttConfig], SttEngine]] = {"whisper": _whisper, "bench": _bench}


def create(cfg: SttConfig) -> SttEngine:
    """The engine ``cfg.engine`` names, loaded and ready."""
    try:
        factory = ENGINES[cfg.engine]
    except KeyError:
        raise ConfigError(f"VB_STT_ENGINE={cfg.engine!r}: use one of {', '.join(ENGINES)}") from None
    return factory(cfg)
