"""The benchmark STT: a fixed transcript a fixed time after it is told that speech ended.

It stands in for a streaming provider in the ``turn`` benchmark (shared/bench/SCENARIO.md) so that
what is measured beyond its latency is the framework's own cost. It takes every frame and ignores it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from services.stt.engines.base import ResultQueue, SttEngine, SttResult, SttStream


class BenchStream(SttStream):
    """Answers each ``speech_ended`` with one final, ``delay_s`` later on the event loop's clock."""

    def __init__(self, text: str, delay_s: float) -> None:
        self._final = SttResult(text=text, is_final=True, flushed=True)
        self._delay_s = delay_s
        self._results = ResultQueue()
        self._timers: set[asyncio.TimerHandle] = set()

    async def push(self, pcm: bytes) -> None:
        """Audio is consumed and dropped."""

    async def speech_started(self) -> None:
        """Nothing to prepare: the transcript is fixed."""

    async def speech_ended(self) -> None:
        """Schedule the final (a timer, not a task: nothing to await when the stream closes)."""
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def emit() -> None:
            assert handle is not None
            self._timers.discard(handle)
            self._results.put(self._final)

        handle = loop.call_later(self._delay_s, emit)
        self._timers.add(handle)

    def results(self) -> AsyncIterator[SttResult]:
        """The finals, one per ``speech_ended``."""
        return aiter(self._results)

    async def aclose(self) -> None:
        """Drop finals not yet due and end ``results()``."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        self._results.close()


class BenchEngine(SttEngine):
    """Fixed-latency fake provider; ``text`` and ``delay_s`` come from the stage's settings."""

    name = "bench"

    def __init__(self, *, text: str, delay_s: float) -> None:
        self.text, self.delay_s = text, delay_s

    async def open(self, session: str, language: str) -> SttStream:
        """A stream that answers every end of speech with ``text``."""
        return BenchStream(self.text, self.delay_s)
