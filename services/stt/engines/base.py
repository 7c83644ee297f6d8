"""The STT engine interface: a per-session recognition stream, fed every caller frame.

The stt service pushes every 20 ms frame (speech and silence alike) and tells the stream where the
VAD put speech boundaries. A streaming engine (Deepgram) sends everything and finalizes on
``speech_ended``; a segment engine (Whisper) keeps the frames of the current segment (plus a short
pre-roll) and transcribes them when the segment ends. Results come out of ``results()``.

Word times are in ms from the first frame pushed into the stream (where a provider's stream clock
starts); the service shifts them to stream time. Every ``speech_ended`` is answered by exactly one
result with ``flushed`` set, empty text included: the service's endpointing waits for it.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from proto.events import Word


@dataclass(frozen=True, slots=True)
class SttResult:
    """Recognised text. Partials replace each other; a final settles its audio.

    ``flushed`` marks the final that answers ``speech_ended`` (whisper's segment transcript,
    Deepgram's ``from_finalize`` result): the service waits for it before endpointing.
    ``endpoint`` marks a final the engine itself considers the end of an utterance.
    """

    text: str
    is_final: bool
    words: tuple[Word, ...] = ()
    confidence: float = 1.0
    flushed: bool = False
    endpoint: bool = False
    #: Audio seconds the provider will bill for (cost telemetry).
    billed_s: float = 0.0


class SttStream(abc.ABC):
    """One session's recognition stream."""

    @abc.abstractmethod
    async def push(self, pcm: bytes) -> None:
        """One 20 ms frame of caller audio, 16 kHz mono s16le."""

    @abc.abstractmethod
    async def speech_started(self) -> None:
        """The VAD heard speech begin (the frames pushed just before it may hold its onset)."""

    @abc.abstractmethod
    async def speech_ended(self) -> None:
        """The VAD heard speech end: finalize; a result with ``flushed`` set follows."""

    @abc.abstractmethod
    def results(self) -> AsyncIterator[SttResult]:
        """Recognition results, in order, until the stream is closed."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the stream (close the provider connection)."""


class SttEngine(abc.ABC):
    """Makes recognition streams; loaded once per process, shared by its sessions."""

    name: str = "stt"

    @abc.abstractmethod
    async def open(self, session: str, language: str) -> SttStream:
        """A new stream for one session."""

    async def aclose(self) -> None:
        """Release what the engine holds (models, connection pools)."""


class ResultQueue:
    """Hands results from an engine's producer (a decode task, a socket reader) to ``results()``.

    Unbounded on purpose: results come a few a second and the service reads them at once.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[SttResult | None] = asyncio.Queue()

    def put(self, result: SttResult) -> None:
        """Queue one result for the reader."""
        self._queue.put_nowait(result)

    def close(self) -> None:
        """End the reader's iteration after the results already queued."""
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[SttResult]:
        while (result := await self._queue.get()) is not None:
            yield result
