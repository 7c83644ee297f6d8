"""A chain of LLM engines (e.g. Claude, then the local model) that looks like one engine.

A reply goes to the first engine whose circuit breaker lets it through. If that engine fails before
it has said anything, the next one gets the same request: the caller only notices the delay. If it
fails mid-reply, the text already produced has gone downstream (some of it may already be playing),
so the next engine is asked to *continue* it: the partial reply goes into its instructions, and only
the continuation is streamed on. Instructions rather than an assistant prefill, because prefill is
not portable: newer Claude models answer a conversation ending in an assistant message with a 400,
and the local engine's chat template may not support it either. A failure after a tool call has
been yielded ends the reply there: the tool calls are complete and the dialogue asks again once it
has their results.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import cast

from prometheus_client import Counter

from services.dialogue.engines.base import LlmDelta, LlmEngine, LlmRequest, TextDelta, ToolCall
from services.runtime.config import ConfigError, setting, settings_class
from services.runtime.resilience import CircuitBreaker, ProviderError, ProviderUnavailable

log = logging.getLogger("voicebus.dialogue")

replies_served = Counter(
    "vb_llm_replies_total",
    "LLM replies by the engine that finished them; how: primary, fallback (the engines before it "
    "failed or were skipped), continued (took over mid-reply)",
    ["engine", "how"],
)


@settings_class
@dataclass(frozen=True, kw_only=True)
class FallbackSettings:
    """When the LLM chain stops trying an engine that keeps failing."""

    breaker_threshold: int = setting(
        "VB_LLM_BREAKER_THRESHOLD", 2, "Consecutive failures after which an LLM engine is skipped."
    )
    breaker_cooldown_s: float = setting(
        "VB_LLM_BREAKER_COOLDOWN", 30.0, "Seconds a failing LLM engine is skipped before one trial reply."
    )

    def __post_init__(self) -> None:
        if self.breaker_threshold < 1 or self.breaker_cooldown_s <= 0:
            raise ConfigError("VB_LLM_BREAKER_THRESHOLD must be >= 1 and VB_LLM_BREAKER_COOLDOWN > 0")


def continuation(request: LlmRequest, said: str) -> LlmRequest:
    """The request that asks an engine to go on with a reply another engine started."""
    note = (
        "\n\nYour reply to the caller's last message was cut off after these words, which the caller "
        f'has already been given: "{said}"\nContinue that reply from exactly where it stops, without '
        "repeating any of it; if it stops mid-word, finish the word."
    )
    return replace(request, instructions=request.instructions + note)


def _needs_space(said: str, text: str) -> bool:
    """Whether a continuation starts a new word that the engine did not separate from what was said.

    A word left unfinished (``"tab"`` + ``"le"``) is joined as is; a new sentence or a word after
    punctuation gets its space.
    """
    if not said or said[-1].isspace() or not text or text[0].isspace():
        return False
    return not said[-1].isalnum() or text[0].isupper()


class FallbackLlmEngine(LlmEngine):
    """The engines in order of preference, each behind its own circuit breaker."""

    name = "fallback"

    def __init__(self, engines: Sequence[LlmEngine], settings: FallbackSettings | None = None) -> None:
        if not engines:
            raise ValueError("a fallback chain needs at least one engine")
        s = settings or FallbackSettings()
        self.chain = [
            (
                engine,
                CircuitBreaker(engine.name, threshold=s.breaker_threshold, cooldown_s=s.breaker_cooldown_s),
            )
            for engine in engines
        ]

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        """Stream the reply from the first engine that can give it, switching on failure."""
        said, called = "", False
        error: ProviderError | None = None
        for engine, breaker in self.chain:
            if not breaker.allow():
                continue
            took_over, produced, produced_text = bool(said), False, False
            # base.py: an engine's stream is an async generator, closed to cancel the generation
            stream = cast(
                AsyncGenerator[LlmDelta], engine.stream(continuation(request, said) if took_over else request)
            )
            try:
                async with aclosing(stream) as deltas:
                    async for delta in deltas:
                        produced = True
                        match delta:
                            case TextDelta(text=text):
                                if took_over and not produced_text and _needs_space(said, text):
                                    delta = TextDelta(text=f" {text}")
                                produced_text = True
                                said += delta.text
                            case ToolCall():
                                called = True
                        yield delta
            except ProviderError as err:
                breaker.failure(err)
                error = err
                log.warning(
                    "llm engine %s failed %s (%s): %s",
                    engine.name,
                    "mid-reply" if produced else "before replying",
                    err.kind,
                    err,
                )
                if called:
                    return
                continue
            except Exception as err:  # a bug, not a provider failure: count it and let it surface
                breaker.failure(err)
                raise
            except BaseException:
                # the caller closed the reply (barge-in) or was cancelled: the engine did not fail
                if produced:
                    breaker.success()
                else:
                    breaker.release()
                raise
            breaker.success()
            how = "continued" if took_over else "primary" if engine is self.chain[0][0] else "fallback"
            replies_served.labels(engine.name, how).inc()
            if error:
                log.info("llm reply served by %s (%s)", engine.name, how)
            return
        raise error or ProviderUnavailable(self.name, "every engine is skipped by its circuit breaker")

    async def aclose(self) -> None:
        """Close every engine of the chain."""
        for engine, _ in self.chain:
            await engine.aclose()
