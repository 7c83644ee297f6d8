"""tts engines: the interface (base.py), one module per engine, and the chain the service speaks with.

``VB_TTS_ENGINE`` picks the engine that speaks and ``VB_TTS_FALLBACK`` the ones that take over when
it fails (``fallback.FallbackTtsEngine``: a circuit breaker per engine; the reply goes on from the
chunk that was cut). An engine that fails to load is left out of the chain, so a broken piper install
still leaves flite speaking. Engine modules are imported only when chosen (piper pulls in onnxruntime
and a 60 MB voice).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.runtime import engines
from services.tts.config import TtsConfig
from services.tts.engines.base import TtsEngine
from services.tts.engines.fallback import FallbackSettings, FallbackTtsEngine

if TYPE_CHECKING:
    from services.tts.engines.elevenlabs import ElevenLabsSettings

#: Engines in order of preference; ``auto`` fallbacks are the local engines after the primary.
CHOICE = engines.Choice(
    "tts",
    preference=("elevenlabs", "piper", "flite"),
    local=("piper", "flite"),
    known=("elevenlabs", "piper", "flite", "bench"),
)


def chain_names(cfg: TtsConfig, cloud_key: bool) -> list[str]:
    """The engines to load, primary first."""
    return CHOICE.names(cfg.engine, cfg.fallback, cloud_key)


def load_engine(name: str, cfg: TtsConfig, elevenlabs: ElevenLabsSettings) -> TtsEngine:
    """Load one engine by name."""
    if name == "elevenlabs":
        from services.tts.engines.elevenlabs import ElevenLabsEngine

        return ElevenLabsEngine(elevenlabs)
    if name == "piper":
        from services.tts.engines import piper

        return piper.load(cfg)
    if name == "flite":
        from services.tts.engines import flite

        return flite.load(cfg)
    from services.tts.engines import bench

    return bench.load(cfg)


def load_chain(cfg: TtsConfig, elevenlabs: ElevenLabsSettings, fallback: FallbackSettings) -> TtsEngine:
    """The engine the service speaks with: the primary, behind a fallback chain when there is one."""
    names = chain_names(cfg, elevenlabs.enabled)
    loaded = engines.load_all("tts", names, lambda name: load_engine(name, cfg, elevenlabs))
    return loaded[0] if len(loaded) == 1 else FallbackTtsEngine(loaded, fallback)
