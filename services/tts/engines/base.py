"""The TTS engine interface: a stream per reply, fed text chunks as the LLM writes them.

One ``TtsStream`` per (turn, generation): text chunks go in as they arrive (``push_text``), audio
comes out of ``audio()`` as it is synthesised, at the engine's native rate (the tts service resamples
to the session's rate and cuts 20 ms frames). ``cancel`` drops queued text and closes the provider
side at once (barge-in); ``end`` says no more text will come.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass

from proto.events import WordTiming


@dataclass(frozen=True, slots=True)
class SynthAudio:
    """A piece of synthesised audio of chunk ``chunk`` (mono s16le at ``sample_rate``).

    ``words``: timings of words in this piece, in ms from the start of the chunk's audio, when the
    engine gives alignment (the service estimates them from the text otherwise).
    """

    pcm: bytes
    sample_rate: int
    chunk: int
    words: tuple[WordTiming, ...] = ()


class TtsStream(abc.ABC):
    """Synthesis of one reply."""

    @abc.abstractmethod
    async def push_text(self, text: str, chunk: int) -> None:
        """Queue one speakable chunk of the reply."""

    @abc.abstractmethod
    async def end(self) -> None:
        """No more text: finish synthesising what is queued, then end ``audio()``."""

    @abc.abstractmethod
    def audio(self) -> AsyncIterator[SynthAudio]:
        """Audio as it is synthesised, in chunk order, until the reply is done or cancelled."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Drop queued text, stop synthesis and close the provider side now."""


class TtsEngine(abc.ABC):
    """Makes synthesis streams; loaded once per process, shared by its sessions."""

    name: str = "tts"

    @abc.abstractmethod
    async def open(self, session: str, reply_id: str, voice: str = "") -> TtsStream:
        """A stream for one reply; ``reply_id`` is unique per (session, turn, generation)."""

    async def aclose(self) -> None:
        """Release what the engine holds (voice model, connections)."""
