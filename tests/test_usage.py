"""Usage is priced from the configured table, and the per-turn usage table shows what each turn cost."""

from __future__ import annotations

import pytest

from services.runtime import usage
from services.runtime.config import ConfigError, load
from services.tools import turns as table
from services.tools.caller import Turn


def test_a_turn_is_priced_from_the_table_and_offline_engines_cost_nothing() -> None:
    usage.configure(load(usage.Pricing, {"VB_PRICE_ANTHROPIC_INPUT_PER_MTOK": "3"}))
    try:
        claude = {"llm_input_tokens": 1e6, "llm_cache_read_tokens": 1e6, "llm_output_tokens": 2e5}
        assert usage.cost("anthropic", claude) == pytest.approx(3 + 0.1 + 1.0)
        assert usage.cost("deepgram", {"stt_audio_s": 120}) == pytest.approx(2 * 0.0077)
        assert usage.cost("elevenlabs", {"tts_chars": 2000}) == pytest.approx(0.1)
        assert usage.cost("local", {"llm_input_tokens": 5000}) == 0.0
    finally:
        usage.configure(usage.Pricing())
    with pytest.raises(ConfigError, match="VB_PRICE_"):
        usage.Pricing(deepgram_per_min=-1)


def test_the_usage_table_shows_each_turn_its_cost_and_the_cached_share() -> None:
    first = Turn(1, usage={"llm_input_tokens": 90, "llm_cache_write_tokens": 10, "cost_usd": 0.002})
    second = Turn(2, usage={"llm_input_tokens": 20, "llm_cache_read_tokens": 80, "tts_chars": 42})
    rendered = table.render_usage([first, second]).splitlines()
    assert rendered[2].split()[-1] == "0%" and rendered[3].split()[-1] == "80%"
    assert "0.00200" in rendered[2] and "42" in rendered[3]
    assert rendered[4].startswith("all") and "110" in rendered[4]  # input tokens over the call
    assert table.render_usage([Turn(1)]) == ""  # no usage reported: no table
