"""tts engines: the interface (base.py), one module per engine, and the chain the service speaks with.

``VB_TTS_ENGINE`` picks the engine that speaks and ``VB_TTS_FALLBACK`` the ones that take over when
it fails (``fallback.FallbackTtsEngine``: a circuit breaker per engine; the reply goes on from the
chunk that was cut). An engine that fails to load is left out of the chain, so a broken piper install
still leaves flite speaking. Engine modules are imported only when chosen (piper pulls in onnxruntime
and a 60 MB voice).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from services.runtime.config import ConfigError
from services.runtime.resilience import ProviderUnavailable
from services.tts.config import TtsConfig
from services.tts.engines.base import TtsEngine
from services.tts.engines.fallback import FallbackSettings, FallbackTtsEngine

if TYPE_CHECKING:
    from services.tts.engines.elevenlabs import ElevenLabsSettings

log = logging.getLogger("voicebus.tts")

#: Engines in order of preference; ``auto`` fallbacks are the local engines after the primary.
PREFERENCE = ("elevenlabs", "piper", "flite")
LOCAL = ("piper", "flite")
ENGINES = (*PREFERENCE, "bench")


def chain_names(cfg: TtsConfig, cloud_key: bool) -> list[str]:
    """The engines to load, primary first."""
    primary = cfg.engine if cfg.engine != "auto" else "elevenlabs" if cloud_key else "piper"
    if cfg.fallback == "auto":
        after = PREFERENCE[PREFERENCE.index(primary) + 1 :] if primary in PREFERENCE else ()
        rest = [n for n in after if n in LOCAL]
    elif cfg.fallback == "none":
        rest = []
    else:
        rest = [n.strip() for n in cfg.fallback.split(",") if n.strip()]
    names = list(dict.fromkeys([primary, *rest]))
    if unknown := [n for n in names if n not in ENGINES]:
        raise ConfigError(f"unknown tts engine {', '.join(unknown)}: use {', '.join(ENGINES)}")
    return names


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
    """The engine the service speaks with: the primary, behind a fallback chain when there is one.

    A misconfiguration (ConfigError) stops the replica; any other load failure leaves that engine out.
    """
    names = chain_names(cfg, elevenlabs.enabled)
    loaded: list[TtsEngine] = []
    for name in names:
        try:
            loaded.append(load_engine(name, cfg, elevenlabs))
        except ConfigError:
            raise
        except Exception as e:  # a missing model, a broken install: the next engine may still work
            log.error("tts engine %s failed to load: %s", name, e, exc_info=True)
    if not loaded:
        raise ProviderUnavailable("tts", f"no engine could be loaded (tried {', '.join(names)})")
    log.info("tts engines: %s", " -> ".join(e.name for e in loaded))
    return loaded[0] if len(loaded) == 1 else FallbackTtsEngine(loaded, fallback)
