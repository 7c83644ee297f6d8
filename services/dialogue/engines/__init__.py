"""dialogue engines: the interface (base.py), one module per engine, and the chain the stage replies with.

``VB_LLM_ENGINE`` picks the engine (``auto``: Claude when ``ANTHROPIC_API_KEY`` is set, else the
offline local model) and ``VB_LLM_FALLBACK`` the ones that take over when it fails
(``fallback.FallbackLlmEngine``). Each local engine module has ``create(cfg) -> LlmEngine``; it is
imported only when chosen, so an engine's heavy dependencies (a native library, a provider SDK) load
only where it runs.
"""

from __future__ import annotations

import importlib

from services.dialogue.config import DialogueConfig
from services.dialogue.engines.anthropic import AnthropicEngine, AnthropicSettings
from services.dialogue.engines.base import LlmEngine
from services.dialogue.engines.fallback import FallbackLlmEngine, FallbackSettings
from services.runtime import engines

MODULES: dict[str, str] = {
    "local": "services.dialogue.engines.local",
    "scripted": "services.dialogue.engines.scripted",
    "bench": "services.dialogue.engines.bench",
}

#: Engines in order of preference; ``auto`` fallbacks are the local engines after the primary.
CHOICE = engines.Choice(
    "dialogue", preference=("anthropic", "local"), local=("local",), known=("anthropic", *MODULES)
)


def chain_names(cfg: DialogueConfig, cloud_key: bool) -> list[str]:
    """The engines to load, primary first."""
    return CHOICE.names(cfg.llm_engine, cfg.llm_fallback, cloud_key)


def load_engine(name: str, cfg: DialogueConfig, anthropic: AnthropicSettings) -> LlmEngine:
    """One engine by name, ready to stream (models loaded)."""
    if name == "anthropic":
        return AnthropicEngine(anthropic)
    engine: LlmEngine = importlib.import_module(MODULES[name]).create(cfg)
    return engine


def create(
    cfg: DialogueConfig,
    anthropic: AnthropicSettings | None = None,
    fallback: FallbackSettings | None = None,
) -> LlmEngine:
    """The engine the stage replies with: the primary, behind a fallback chain when there is one."""
    anthropic = anthropic or AnthropicSettings()
    names = chain_names(cfg, bool(anthropic.api_key))
    loaded = engines.load_all("dialogue", names, lambda name: load_engine(name, cfg, anthropic))
    return loaded[0] if len(loaded) == 1 else FallbackLlmEngine(loaded, fallback)
