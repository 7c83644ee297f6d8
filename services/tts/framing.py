"""From engine audio to the frames egress plays: resampling, exact 20 ms frames, word timings.

An engine hands over pieces of any length at its own rate. One ``ReplyAudio`` per reply resamples
them (soxr, streaming, so a piece boundary leaves no click) to the session's rate and cuts exact
20 ms frames, carrying the remainder into the next piece; only the reply's very last frame is
padded with silence. Word timings are in ms from the reply's first frame: the engine's own where it
gives them, else estimated by spreading the chunk's audio over its words by character count. The
frames that are ready together leave in ``groups`` (one ``AgentAudio`` event each).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import soxr

from proto.events import AGENT_AUDIO_MAX_FRAMES, WordTiming, frame_bytes
from services.tts.engines.base import SynthAudio


def estimate_words(text: str, duration_ms: float, offset_ms: float = 0.0) -> tuple[WordTiming, ...]:
    """Words of ``text`` laid end to end over ``duration_ms``, each as long as its share of characters."""
    words = text.split()
    total = sum(len(w) for w in words)
    timings, done = [], 0
    for word in words:
        start = offset_ms + duration_ms * done / total
        done += len(word)
        end = offset_ms + duration_ms * done / total
        timings.append(WordTiming(text=word, start_ms=round(start), end_ms=round(end)))
    return tuple(timings)


def shift(words: tuple[WordTiming, ...], offset_ms: float) -> tuple[WordTiming, ...]:
    """The same words, ``offset_ms`` later."""
    return tuple(
        WordTiming(text=w.text, start_ms=round(w.start_ms + offset_ms), end_ms=round(w.end_ms + offset_ms))
        for w in words
    )


def duration_ms(pcm: bytes, sample_rate: int) -> float:
    """Length of mono s16le audio."""
    return len(pcm) / 2 / sample_rate * 1000


class Framer:
    """Resamples a stream of pieces to ``out_rate`` and cuts it into exact frames."""

    def __init__(self, out_rate: int, quality: str = "HQ") -> None:
        self.out_rate, self.quality = out_rate, quality
        self._frame = frame_bytes(out_rate)
        self._in_rate = out_rate
        self._resampler: soxr.ResampleStream | None = None
        self._pending = bytearray()

    def push(self, pcm: bytes, sample_rate: int) -> list[bytes]:
        """Frames completed by this piece; what is left over waits for the next piece."""
        if sample_rate != self._in_rate:  # e.g. the fallback engine speaks at another rate
            self._drain_resampler()
            self._in_rate = sample_rate
            if sample_rate != self.out_rate:
                self._resampler = soxr.ResampleStream(
                    sample_rate, self.out_rate, 1, dtype="int16", quality=self.quality
                )
        if self._resampler is None:
            self._pending += pcm
        else:
            self._pending += self._resampler.resample_chunk(np.frombuffer(pcm, np.int16)).tobytes()
        return self._cut()

    def flush(self) -> list[bytes]:
        """The rest of the audio; the last frame is padded with silence."""
        self._drain_resampler()
        frames = self._cut()
        if self._pending:
            frames.append(bytes(self._pending) + bytes(self._frame - len(self._pending)))
            self._pending.clear()
        return frames

    def _drain_resampler(self) -> None:
        if self._resampler is not None:
            self._pending += self._resampler.resample_chunk(np.zeros(0, np.int16), last=True).tobytes()
            self._resampler = None

    def _cut(self) -> list[bytes]:
        whole = len(self._pending) // self._frame * self._frame
        frames = [bytes(self._pending[i : i + self._frame]) for i in range(0, whole, self._frame)]
        del self._pending[:whole]
        return frames


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame of the reply, ready to publish."""

    index: int
    chunk: int
    pcm: bytes
    words: tuple[WordTiming, ...] = ()


def groups(frames: list[Frame]) -> list[list[Frame]]:
    """``frames`` (consecutive, ready now) as runs of one chunk of at most ``AGENT_AUDIO_MAX_FRAMES``.

    Nothing waits for frames still to come: the caller publishes every group at once.
    """
    runs: list[list[Frame]] = []
    for frame in frames:
        if runs and runs[-1][-1].chunk == frame.chunk and len(runs[-1]) < AGENT_AUDIO_MAX_FRAMES:
            runs[-1].append(frame)
        else:
            runs.append([frame])
    return runs


class ReplyAudio:
    """One reply's audio timeline: frames numbered from 0, word timings from the reply's start.

    A chunk's words ride on its first frame. An engine that times words gives them with the chunk's
    first piece (the local engines time a whole chunk at once); words of later pieces (streaming
    alignment) ride on the first frame made after them. For an engine that gives no timings, a chunk's
    frames are held until its audio is complete, then its words are estimated over that audio by
    character count (``texts`` maps chunk index to text): right timings, at the cost of latency.
    """

    def __init__(self, out_rate: int, texts: Mapping[int, str], quality: str = "HQ") -> None:
        self._framer = Framer(out_rate, quality)
        self._texts = texts
        self.frames = 0
        #: Audio received so far, in ms of the engines' own audio (rate independent).
        self.ms = 0.0
        self._chunk: int | None = None
        self._chunk_start_ms = 0.0
        self._chunk_timed = False
        self._words: list[WordTiming] = []  # waiting for the next frame
        self._held: list[bytes] = []  # frames of an untimed chunk, waiting for its words

    def add(self, piece: SynthAudio) -> list[Frame]:
        """Frames ready to publish once ``piece`` is in."""
        frames = []
        if piece.chunk != self._chunk:
            frames += self._close_chunk()
            self._chunk, self._chunk_start_ms, self._chunk_timed = piece.chunk, self.ms, bool(piece.words)
        if self._chunk_timed:
            self._words += shift(piece.words, self._chunk_start_ms)
        self.ms += duration_ms(piece.pcm, piece.sample_rate)
        pcms = self._framer.push(piece.pcm, piece.sample_rate)
        if not self._chunk_timed:
            self._held += pcms
            return frames
        return frames + self._number(pcms, piece.chunk)

    def finish(self) -> list[Frame]:
        """The last frames of the reply (the very last one padded)."""
        frames = self._close_chunk()
        pcms = self._framer.flush()
        if not pcms and self._words:  # words must ride on a frame: a silent one if no audio is left
            pcms = [bytes(frame_bytes(self._framer.out_rate))]
        return frames + self._number(pcms, self._chunk or 0)

    def _close_chunk(self) -> list[Frame]:
        """An untimed chunk is complete: estimate its words and let its frames go."""
        if self._chunk is None or self._chunk_timed:
            return []
        text = self._texts.get(self._chunk, "")
        self._words += estimate_words(text, self.ms - self._chunk_start_ms, self._chunk_start_ms)
        self._chunk_timed = True
        held, self._held = self._held, []
        return self._number(held, self._chunk)

    def _number(self, pcms: list[bytes], chunk: int) -> list[Frame]:
        frames = []
        for pcm in pcms:
            frames.append(Frame(self.frames, chunk, pcm, tuple(self._words)))
            self._words.clear()
            self.frames += 1
        return frames
