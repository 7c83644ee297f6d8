"""Each stage picks its engines by one rule: the cloud engine when its key is set (from the
environment or a ``<VAR>_FILE`` secret), the offline engine otherwise, the offline ones as fallbacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from services import dialogue, stt, tts
from services.dialogue.config import DialogueConfig
from services.dialogue.engines.anthropic import AnthropicSettings
from services.runtime.config import ConfigError, load
from services.stt.config import SttConfig
from services.stt.engines.deepgram import DeepgramSettings
from services.tts.config import TtsConfig
from services.tts.engines.elevenlabs import ElevenLabsSettings


@pytest.mark.parametrize(
    ("keyed", "stt_chain", "llm_chain", "tts_chain"),
    [
        (False, ["whisper"], ["local"], ["piper", "flite"]),
        (True, ["deepgram", "whisper"], ["anthropic", "local"], ["elevenlabs", "piper", "flite"]),
    ],
)
def test_auto_picks_the_cloud_engine_only_with_its_key(
    tmp_path: Path, keyed: bool, stt_chain: list[str], llm_chain: list[str], tts_chain: list[str]
) -> None:
    env: dict[str, str] = {}
    if keyed:  # one key in the environment, the others as secret files
        for var in ("ANTHROPIC_API_KEY", "ELEVENLABS_API_KEY"):
            (tmp_path / var).write_text("sk-from-a-file\n")
            env[f"{var}_FILE"] = str(tmp_path / var)
        env["DEEPGRAM_API_KEY"] = "dg-from-the-env"
    deepgram = load(DeepgramSettings, env)
    anthropic = load(AnthropicSettings, env)
    eleven = load(ElevenLabsSettings, env)
    if keyed:
        assert (deepgram.api_key, anthropic.api_key, eleven.api_key) == (
            "dg-from-the-env",
            "sk-from-a-file",
            "sk-from-a-file",
        )
    assert stt.engines.chain_names(load(SttConfig, env), bool(deepgram.api_key)) == stt_chain
    assert dialogue.engines.chain_names(load(DialogueConfig, env), bool(anthropic.api_key)) == llm_chain
    assert tts.engines.chain_names(load(TtsConfig, env), eleven.enabled) == tts_chain


def test_explicit_choices_and_fallbacks_win() -> None:
    cfg = load(SttConfig, {"VB_STT_ENGINE": "bench", "VB_STT_FALLBACK": "auto"})
    assert stt.engines.chain_names(cfg, True) == ["bench"]
    cfg = load(SttConfig, {"VB_STT_ENGINE": "deepgram", "VB_STT_FALLBACK": "none"})
    assert stt.engines.chain_names(cfg, True) == ["deepgram"]
    llm = load(DialogueConfig, {"VB_LLM_ENGINE": "anthropic", "VB_LLM_FALLBACK": "scripted"})
    assert dialogue.engines.chain_names(llm, False) == ["anthropic", "scripted"]
    with pytest.raises(ConfigError, match="unknown stt engine vosk"):
        stt.engines.chain_names(load(SttConfig, {"VB_STT_FALLBACK": "vosk"}), False)


def test_a_cloud_engine_without_its_key_stops_the_replica() -> None:
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY is not set"):
        dialogue.engines.create(load(DialogueConfig, {"VB_LLM_ENGINE": "anthropic"}), AnthropicSettings())
    with pytest.raises(ConfigError, match="DEEPGRAM_API_KEY is not set"):
        stt.engines.load_chain(
            load(SttConfig, {"VB_STT_ENGINE": "deepgram", "VB_STT_FALLBACK": "none"}),
            DeepgramSettings(),
            stt.engines.FallbackSettings(),
        )
