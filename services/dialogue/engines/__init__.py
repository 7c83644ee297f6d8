"""dialogue engines: the interface (base.py) and one module per engine, chosen by ``VB_LLM_ENGINE``.

Each engine module has ``create(cfg) -> LlmEngine``; it is imported only when chosen, so an engine's
heavy dependencies (a native library, a provider SDK) load only where it runs.
"""

from __future__ import annotations

import importlib

from services.dialogue.config import DialogueConfig
from services.dialogue.engines.base import LlmEngine
from services.runtime.config import ConfigError

ENGINES: dict[str, str] = {
    "local": "services.dialogue.engines.local",
    "scripted": "services.dialogue.engines.scripted",
    "bench": "services.dialogue.engines.bench",
    "anthropic": "services.dialogue.engines.anthropic",
}


def create(cfg: DialogueConfig) -> LlmEngine:
    """The engine ``cfg.llm_engine`` names, ready to stream (models loaded)."""
    module = ENGINES.get(cfg.llm_engine)
    if module is None:
        raise ConfigError(f"VB_LLM_ENGINE={cfg.llm_engine!r}: use one of {', '.join(ENGINES)}")
    engine: LlmEngine = importlib.import_module(module).create(cfg)
    return engine
