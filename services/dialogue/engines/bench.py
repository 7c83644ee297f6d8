"""The benchmark's fake LLM (shared/bench/SCENARIO.md): fixed latencies, so what is measured is voicebus.

First token 200 ms after the request, then the other 19 tokens 10 ms apart on an absolute schedule
(a late wake-up does not push the later tokens back), each one word with its leading space.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from services.dialogue.config import DialogueConfig
from services.dialogue.engines.base import LlmDelta, LlmEngine, LlmRequest, TextDelta, Usage

REPLY = (
    "The weather today is sunny and warm with light wind. "
    "Tonight will be clear and cool with calm air everywhere."
)
FIRST_TOKEN_S = 0.200
TOKEN_INTERVAL_S = 0.010


class BenchEngine(LlmEngine):
    """Always the same two sentences on the same schedule, whatever the request."""

    name = "bench"

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        """The benchmark reply, token i at request + 200 ms + i * 10 ms."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        words = REPLY.split()
        for i, word in enumerate(words):
            await asyncio.sleep(max(0.0, start + FIRST_TOKEN_S + i * TOKEN_INTERVAL_S - loop.time()))
            yield TextDelta(f" {word}")
        yield Usage(output_tokens=len(words))


def create(cfg: DialogueConfig) -> BenchEngine:
    """The bench engine has no settings."""
    return BenchEngine()
