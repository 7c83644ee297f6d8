"""The local engine with the real SmolLM2 model: it streams, and closing the stream stops llama.cpp."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.dialogue.config import DialogueConfig
from services.dialogue.engines import local
from services.dialogue.engines.base import ChatMessage, LlmRequest, TextDelta, Usage
from services.runtime.config import load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[local.LocalEngine]:
    loaded = await asyncio.to_thread(local.create, load(DialogueConfig, environ={}, llm_parallel=1))
    yield loaded
    await loaded.aclose()


def ask(text: str, max_tokens: int) -> LlmRequest:
    return LlmRequest(
        instructions="You are a friendly voice assistant. Answer in one short sentence.",
        messages=[ChatMessage("user", text)],
        max_tokens=max_tokens,
    )


async def test_streams_a_reply_to_a_short_prompt(engine: local.LocalEngine) -> None:
    deltas = [d async for d in engine.stream(ask("Say hello to me.", 24))]
    text = "".join(d.text for d in deltas if isinstance(d, TextDelta))
    assert text.strip()
    assert sum(isinstance(d, TextDelta) for d in deltas) > 1  # token by token, not all at once
    (usage,) = [d for d in deltas if isinstance(d, Usage)]
    assert 0 < usage.output_tokens <= 24 and usage.input_tokens > 0


async def test_closing_the_stream_stops_generation(engine: local.LocalEngine) -> None:
    before = engine.counters()["tokens_predicted_total"]
    stream = engine.stream(ask("Tell me a very long story about a dragon and a castle.", 400))
    received = 0
    async for delta in stream:
        received += isinstance(delta, TextDelta)
        if received == 3:
            break
    await stream.aclose()
    # with one slot the next request runs once the closed one has let go of it
    (usage,) = [d async for d in engine.stream(ask("Hi", 4)) if isinstance(d, Usage)]
    predicted = engine.counters()["tokens_predicted_total"] - before - usage.output_tokens
    assert received <= predicted <= received + 3
