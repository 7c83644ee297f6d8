"""Usage and cost per turn: what each stage's provider bills, priced from a table in the configuration.

A stage calls ``record`` once per turn with the amounts its engine used (audio seconds sent to STT,
LLM tokens by kind, characters sent to TTS). They go three ways: Prometheus counters (usage by kind
and cost, per stage and engine), attributes of the current span (the turn's), and a ``TurnUsage``
event on the session's timing channel, which the per-turn table reads. Offline engines cost nothing
but their usage is still counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from prometheus_client import Counter

from proto import events as ev
from proto import subjects as sj
from services.runtime.config import ConfigError, setting, settings_class

if TYPE_CHECKING:
    from services.runtime.service import SessionContext

usage_total = Counter(
    "vb_usage_total",
    "Provider usage by stage, engine and kind (seconds, tokens, characters)",
    ["stage", "engine", "kind"],
)
cost_total = Counter("vb_cost_usd_total", "Provider cost in USD, from the price table", ["stage", "engine"])


@settings_class
@dataclass(frozen=True, kw_only=True)
class Pricing:
    """List prices of the cloud engines' default models (set your contract's); USD."""

    deepgram_per_min: float = setting(
        "VB_PRICE_DEEPGRAM_PER_MIN", 0.0077, "Deepgram streaming STT, per minute of audio sent."
    )
    anthropic_input_per_mtok: float = setting(
        "VB_PRICE_ANTHROPIC_INPUT_PER_MTOK", 1.0, "Claude input tokens (uncached), per million."
    )
    anthropic_output_per_mtok: float = setting(
        "VB_PRICE_ANTHROPIC_OUTPUT_PER_MTOK", 5.0, "Claude output tokens, per million."
    )
    anthropic_cache_read_per_mtok: float = setting(
        "VB_PRICE_ANTHROPIC_CACHE_READ_PER_MTOK", 0.1, "Claude prompt-cache reads, per million tokens."
    )
    anthropic_cache_write_per_mtok: float = setting(
        "VB_PRICE_ANTHROPIC_CACHE_WRITE_PER_MTOK", 1.25, "Claude prompt-cache writes (5 min), per million."
    )
    elevenlabs_per_1k_chars: float = setting(
        "VB_PRICE_ELEVENLABS_PER_1K_CHARS", 0.05, "ElevenLabs TTS (flash models), per 1000 characters."
    )

    def __post_init__(self) -> None:
        if min(dataclasses.astuple(self)) < 0:
            raise ConfigError("VB_PRICE_* prices cannot be negative")

    def unit_prices(self) -> dict[tuple[str, str], float]:
        """(engine, kind) -> USD per unit of ``TurnUsage.amounts``."""
        return {
            ("deepgram", "stt_audio_s"): self.deepgram_per_min / 60,
            ("anthropic", "llm_input_tokens"): self.anthropic_input_per_mtok / 1e6,
            ("anthropic", "llm_output_tokens"): self.anthropic_output_per_mtok / 1e6,
            ("anthropic", "llm_cache_read_tokens"): self.anthropic_cache_read_per_mtok / 1e6,
            ("anthropic", "llm_cache_write_tokens"): self.anthropic_cache_write_per_mtok / 1e6,
            ("elevenlabs", "tts_chars"): self.elevenlabs_per_1k_chars / 1000,
        }


_prices = Pricing().unit_prices()


def configure(pricing: Pricing) -> None:
    """Use this price table (a stage's entry point loads it from the environment)."""
    global _prices
    _prices = pricing.unit_prices()


def cost(engine: str, amounts: Mapping[str, float]) -> float:
    """The price of ``amounts`` used on ``engine`` (0 for engines not in the table: offline ones)."""
    return sum(n * _prices.get((engine, kind), 0.0) for kind, n in amounts.items())


def record(ctx: SessionContext[Any], turn: int, engine: str, amounts: Mapping[str, float]) -> None:
    """Count a turn's usage: metrics and span attributes now, the TurnUsage event beside the turn."""
    amounts = {kind: n for kind, n in amounts.items() if n}
    if not amounts:
        return
    price = cost(engine, amounts)
    stage = ctx.stage
    span = trace.get_current_span()
    for kind, n in amounts.items():
        usage_total.labels(stage, engine, kind).inc(n)
        span.set_attribute(f"usage.{kind}", n)
    cost_total.labels(stage, engine).inc(price)
    span.set_attribute("cost_usd", price)
    event = ev.TurnUsage(
        session=ctx.session, turn=turn, stage=stage, engine=engine, amounts=amounts, cost_usd=price
    )
    ctx.spawn(ctx.publish(sj.TIMING, event), f"usage:{turn}")
