"""tts engines: the interface (base.py), one module per engine, and the chain the service speaks with.

Each engine module has ``load(cfg) -> TtsEngine``; modules are imported only when their engine is
chosen (piper pulls in onnxruntime and a 60 MB voice). ``VB_TTS_ENGINE`` picks the primary engine,
``VB_TTS_FALLBACK`` the one that takes over when it fails.
"""

from __future__ import annotations

import importlib
import logging

from services.runtime.config import ConfigError
from services.tts.config import TtsConfig
from services.tts.engines.base import TtsEngine, TtsError

log = logging.getLogger("voicebus.tts")

#: Engine name -> module that loads it.
ENGINES = {
    "piper": "services.tts.engines.piper",
    "flite": "services.tts.engines.flite",
    "bench": "services.tts.engines.bench",
}


def load_engine(name: str, cfg: TtsConfig) -> TtsEngine:
    """Load one engine by name."""
    if name not in ENGINES:
        raise ConfigError(f"unknown tts engine {name!r}: use one of {', '.join(ENGINES)}")
    engine: TtsEngine = importlib.import_module(ENGINES[name]).load(cfg)
    return engine


def load_chain(cfg: TtsConfig) -> tuple[TtsEngine, ...]:
    """The primary engine and its fallback, in the order they are tried.

    A primary that fails to load is left out (logged): the fallback speaks every reply. Only when no
    engine loads does the replica refuse to start.
    """
    names = [cfg.engine]
    if cfg.fallback and cfg.fallback != cfg.engine:
        names.append(cfg.fallback)
    chain: list[TtsEngine] = []
    for name in names:
        try:
            chain.append(load_engine(name, cfg))
        except ConfigError:
            raise
        except Exception as e:  # a missing model, a broken install: the next engine may still work
            log.error("tts engine %s failed to load: %s", name, e, exc_info=not isinstance(e, TtsError))
    if not chain:
        raise TtsError(f"no tts engine could be loaded (tried {', '.join(names)})")
    log.info("tts engines: %s", " -> ".join(e.name for e in chain))
    return tuple(chain)
