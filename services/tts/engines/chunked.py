"""What the local engines share: a stream that speaks its chunks one after another.

Piper, flite and the bench engine take a whole piece of text and return its audio; they do not stream
text in. A ``ChunkedStream`` queues the pushed chunks and has the engine's ``speak`` say them in order,
one part (a whole chunk, a frame) at a time, so ``cancel`` takes effect at the next part boundary and
drops what is queued. A part that takes longer than the stall timeout is a failure (ProviderTimeout):
the fallback chain moves the reply to the next engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from proto.events import WordTiming
from services.runtime.resilience import ProviderTimeout
from services.tts.engines.base import SynthAudio, TtsStream
from services.tts.framing import duration_ms, estimate_words, shift


def speakable(text: str) -> bool:
    """Whether ``text`` has a letter or digit (punctuation alone makes no sound, or an engine error)."""
    return any(c.isalnum() for c in text)


@dataclass(frozen=True, slots=True)
class Spoken:
    """Audio an engine made for part of a chunk.

    ``words``: timings of the words this part begins (ms from its start; they may run past its end)
    when the engine knows them; ``None`` means estimate them over this part from ``text``.
    """

    text: str
    pcm: bytes
    sample_rate: int
    words: tuple[WordTiming, ...] | None = None


@dataclass(frozen=True, slots=True)
class _Chunk:
    text: str
    index: int
    received: float  # loop time at push


#: An engine's voice: the audio of one chunk, part by part; ``received`` is when it was pushed (loop time).
Speak = Callable[[str, float], AsyncGenerator[Spoken, None]]


class ChunkedStream(TtsStream):
    """A reply's chunks, spoken in order by ``speak``; each part must come within ``stall_s``."""

    def __init__(self, engine: str, speak: Speak, stall_s: float) -> None:
        self._engine, self._speak, self._stall_s = engine, speak, stall_s
        self._queue: asyncio.Queue[_Chunk | None] = asyncio.Queue()
        self._cancelled = False

    async def push_text(self, text: str, chunk: int) -> None:
        """Queue a chunk (a cancelled stream ignores it)."""
        if not self._cancelled:
            self._queue.put_nowait(_Chunk(text, chunk, asyncio.get_running_loop().time()))

    async def end(self) -> None:
        """Finish after the queued chunks."""
        self._queue.put_nowait(None)

    async def audio(self) -> AsyncIterator[SynthAudio]:
        """Each chunk's parts in order, with word timings from the start of the chunk."""
        while not self._cancelled and (chunk := await self._queue.get()) is not None:
            elapsed_ms = 0.0
            async with contextlib.aclosing(self._speak(chunk.text, chunk.received)) as parts:
                while (part := await self._next(parts)) is not None:
                    if self._cancelled:
                        return
                    ms = duration_ms(part.pcm, part.sample_rate)
                    words = estimate_words(part.text, ms) if part.words is None else part.words
                    yield SynthAudio(part.pcm, part.sample_rate, chunk.index, shift(words, elapsed_ms))
                    elapsed_ms += ms

    async def _next(self, parts: AsyncGenerator[Spoken, None]) -> Spoken | None:
        try:
            async with asyncio.timeout(self._stall_s):
                return await anext(parts)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise ProviderTimeout(self._engine, f"no audio for {self._stall_s:.1f} s") from None

    async def cancel(self) -> None:
        """Drop what is queued; the part being made is thrown away when it is done."""
        self._cancelled = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)
