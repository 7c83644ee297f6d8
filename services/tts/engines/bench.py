"""The benchmark's TTS (shared/bench/SCENARIO.md): fixed latency, real-time pace, a tone.

The first 20 ms frame of a chunk comes 80 ms after the chunk was pushed, the next ones at real-time
pace (divided by ``speed``), 24 kHz mono s16le, 100 ms of audio per word. A chunk pushed while an
earlier one is still being produced starts after it. Word timings are exact (100 ms per word) and
come with the chunk's first frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import numpy as np

from proto.events import FRAME_MS, WordTiming
from services.tts.config import TtsConfig
from services.tts.engines.base import TtsEngine, TtsStream
from services.tts.engines.chunked import ChunkedStream, Spoken

RATE = 24_000
FIRST_FRAME_S = 0.080
WORD_MS = 100
STALL_S = 5.0  # the fake never stalls: the watchdog is there because every stream has one
FRAMES_PER_WORD = WORD_MS // FRAME_MS
#: A 400 Hz tone: exactly 8 periods per frame, so consecutive frames join without a click.
TONE = (np.sin(2 * np.pi * 400 * np.arange(RATE * FRAME_MS // 1000) / RATE) * 8000).astype(np.int16).tobytes()


class BenchEngine(TtsEngine):
    """Fixed-latency fake whose frames come ``speed`` times faster than real time."""

    name = "bench"

    def __init__(self, speed: float = 1.0) -> None:
        self.speed = speed

    async def open(self, session: str, reply_id: str, voice: str = "") -> TtsStream:
        """A stream for one reply."""
        return ChunkedStream(self.name, _Schedule(self.speed).speak, STALL_S)


class _Schedule:
    """One reply's frames on an absolute schedule, so a slow consumer does not stretch the timeline."""

    def __init__(self, speed: float) -> None:
        self._step = FRAME_MS / 1000 / speed
        self._free_at = 0.0  # loop time of the frame after the last one produced

    async def speak(self, text: str, received: float) -> AsyncGenerator[Spoken, None]:
        """Five tone frames per word, the first 80 ms after ``received``."""
        loop = asyncio.get_running_loop()
        words = text.split()
        start = max(received + FIRST_FRAME_S, self._free_at)
        self._free_at = start + len(words) * FRAMES_PER_WORD * self._step
        timings = tuple(
            WordTiming(text=word, start_ms=i * WORD_MS, end_ms=(i + 1) * WORD_MS)
            for i, word in enumerate(words)
        )
        for i in range(len(words) * FRAMES_PER_WORD):
            await asyncio.sleep(max(0.0, start + i * self._step - loop.time()))
            yield Spoken(text, TONE, RATE, timings if i == 0 else ())


def load(cfg: TtsConfig) -> BenchEngine:
    """The bench engine at the configured speed."""
    return BenchEngine(cfg.bench_speed)
