"""Which tts engines a replica loads, in which order, from its settings."""

from __future__ import annotations

import pytest

from services.runtime.config import ConfigError
from services.tts.config import TtsConfig
from services.tts.engines import chain_names
from services.tts.engines.flite import FliteEngine


@pytest.mark.parametrize(
    ("engine", "fallback", "cloud_key", "chain"),
    [
        ("auto", "auto", False, ["piper", "flite"]),
        ("auto", "auto", True, ["elevenlabs", "piper", "flite"]),
        ("piper", "auto", True, ["piper", "flite"]),
        ("flite", "auto", False, ["flite"]),
        ("bench", "auto", False, ["bench"]),
        ("piper", "none", False, ["piper"]),
        ("elevenlabs", "flite", True, ["elevenlabs", "flite"]),
        ("flite", "piper, flite", False, ["flite", "piper"]),
    ],
)
def test_the_chain_is_the_primary_then_its_fallbacks(
    engine: str, fallback: str, cloud_key: bool, chain: list[str]
) -> None:
    assert chain_names(TtsConfig(engine=engine, fallback=fallback), cloud_key) == chain


def test_an_unknown_engine_or_flite_voice_stops_the_replica() -> None:
    with pytest.raises(ConfigError, match="unknown tts engine espeak"):
        chain_names(TtsConfig(engine="piper", fallback="espeak"), False)
    with pytest.raises(ConfigError, match="VB_TTS_FLITE_VOICE='nobody'"):
        FliteEngine.load("nobody")
