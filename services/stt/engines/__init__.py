"""stt engines: the interface (base.py), one module per engine, and the chain the stage listens with.

``VB_STT_ENGINE`` picks the engine (``auto``: Deepgram when ``DEEPGRAM_API_KEY`` is set, else the
offline Whisper) and ``VB_STT_FALLBACK`` the ones that take over when it fails
(``fallback.FallbackSttEngine``). Engine modules are imported only when chosen: a bench replica never
loads CTranslate2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.runtime import engines
from services.stt.config import SttConfig
from services.stt.engines.base import SttEngine
from services.stt.engines.fallback import FallbackSettings, FallbackSttEngine

if TYPE_CHECKING:
    from services.stt.engines.deepgram import DeepgramSettings

#: Engines in order of preference; ``auto`` fallbacks are the local engines after the primary.
CHOICE = engines.Choice(
    "stt", preference=("deepgram", "whisper"), local=("whisper",), known=("deepgram", "whisper", "bench")
)


def chain_names(cfg: SttConfig, cloud_key: bool) -> list[str]:
    """The engines to load, primary first."""
    return CHOICE.names(cfg.engine, cfg.fallback, cloud_key)


def load_engine(name: str, cfg: SttConfig, deepgram: DeepgramSettings) -> SttEngine:
    """Load one engine by name (a model is loaded before this returns)."""
    if name == "deepgram":
        from services.stt.engines.deepgram import DeepgramEngine

        return DeepgramEngine(deepgram)
    if name == "whisper":
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
    from services.stt.engines.bench import BenchEngine

    return BenchEngine(text=cfg.bench_text, delay_s=cfg.bench_delay_s)


def load_chain(cfg: SttConfig, deepgram: DeepgramSettings, fallback: FallbackSettings) -> SttEngine:
    """The engine the stage listens with: the primary, behind a fallback chain when there is one."""
    names = chain_names(cfg, bool(deepgram.api_key))
    loaded = engines.load_all("stt", names, lambda name: load_engine(name, cfg, deepgram))
    return loaded[0] if len(loaded) == 1 else FallbackSttEngine(loaded, fallback)
