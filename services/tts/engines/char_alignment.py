"""Character alignment from a streaming TTS provider, turned into the reply's chunks and word timings.

A provider that takes a whole reply in one stream (ElevenLabs: one context per reply, every chunk
flushed into it) returns audio that does not say which chunk it belongs to. Each audio message does
carry the characters it speaks, with start and duration in ms relative to that message. Counting the
letters and digits of the chunks pushed, in order, tells where one chunk's audio ends and the next
begins; the same count maps characters to the chunk's own words. Only letters and digits are counted:
providers normalise whitespace and punctuation, but not the letters of the text they were given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from proto.events import WordTiming
from services.tts.engines.base import SynthAudio


def _letters(text: str) -> int:
    return sum(c.isalnum() for c in text)


@dataclass(slots=True)
class _Chunk:
    index: int
    #: per word of the chunk (tokens with at least one letter): text, ordinal of its first and last letter
    words: list[tuple[str, int, int]]
    total: int
    aligned: int = 0
    #: ms of this chunk's audio already handed out (word times continue from here)
    offset_ms: float = 0.0
    word_start_ms: float = 0.0
    word: int = 0
    pending: list[WordTiming] = field(default_factory=list)


def _chunk(index: int, text: str) -> _Chunk:
    words, ordinal = [], 0
    for token in text.split():
        if n := _letters(token):
            words.append((token, ordinal, ordinal + n - 1))
            ordinal += n
    return _Chunk(index, words, ordinal)


@dataclass(frozen=True, slots=True)
class CharTimes:
    """One audio message's alignment: characters with start and duration in ms from the message start."""

    chars: Sequence[str]
    starts_ms: Sequence[float]
    durations_ms: Sequence[float]


class ChunkAligner:
    """Splits a reply's audio stream into its chunks and derives word timings per chunk.

    ``outstanding`` (letters sent but not yet spoken) is what the stream's deadlines watch: while it is
    zero the provider owes nothing and a quiet socket is not a stall.
    """

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._chunks: list[_Chunk] = []
        self._cur = 0

    def add(self, chunk: int, text: str) -> None:
        """A chunk was sent to the provider (in reply order)."""
        self._chunks.append(_chunk(chunk, text))

    def __contains__(self, chunk: object) -> bool:
        return any(c.index == chunk for c in self._chunks)

    @property
    def outstanding(self) -> int:
        """Letters sent whose audio has not arrived yet."""
        return sum(c.total - c.aligned for c in self._chunks)

    def respeak_unfinished(self) -> list[int]:
        """Forget the progress of every chunk not fully spoken; return their indexes, to send again.

        A chunk cut off part-way is spoken again whole; its new audio and word times follow the audio
        already handed out for it, so times stay relative to the chunk's start.
        """
        todo = [pos for pos, c in enumerate(self._chunks) if c.aligned < c.total]
        for pos in todo:
            c = self._chunks[pos]
            c.aligned, c.word, c.pending = 0, 0, []
        if todo:
            self._cur = todo[0]
        return [self._chunks[pos].index for pos in todo]

    def feed(self, pcm: bytes, times: CharTimes | None) -> list[SynthAudio]:
        """One audio message -> pieces of audio, one per chunk it spans, with the words completed in it."""
        if not self._chunks:
            return []
        pieces: list[SynthAudio] = []
        cut_ms, cut = 0.0, 0
        st = self._chunks[self._cur]
        letters = zip(times.chars, times.starts_ms, times.durations_ms) if times else iter(())
        for ch, start, dur in letters:
            if not ch.isalnum():
                continue
            while st.aligned >= st.total and self._cur + 1 < len(self._chunks):
                at = min(len(pcm), max(cut, self._bytes(start)))
                pieces.append(self._piece(st, pcm[cut:at]))
                cut, cut_ms = at, start
                self._cur += 1
                st = self._chunks[self._cur]
            if st.aligned >= st.total:
                continue  # more letters than were sent: nothing to attribute them to
            at_ms = st.offset_ms + start - cut_ms
            text, first, last = st.words[st.word]
            if st.aligned == first:
                st.word_start_ms = at_ms
            if st.aligned == last:
                st.pending.append(
                    WordTiming(text=text, start_ms=round(st.word_start_ms), end_ms=round(at_ms + dur))
                )
                st.word += 1
            st.aligned += 1
        pieces.append(self._piece(st, pcm[cut:]))
        return [p for p in pieces if p.pcm or p.words]

    def _bytes(self, ms: float) -> int:
        return int(ms * self.sample_rate / 1000) * 2

    def _piece(self, st: _Chunk, pcm: bytes) -> SynthAudio:
        words, st.pending = tuple(st.pending), []
        st.offset_ms += len(pcm) / 2 / self.sample_rate * 1000
        return SynthAudio(pcm=pcm, sample_rate=self.sample_rate, chunk=st.index, words=words)
