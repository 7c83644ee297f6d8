"""The conversation as heard: WAV tracks where every piece of audio sits at the time it was heard.

A ``WavTrack`` is written while the call goes on, off the event loop: audio is placed in memory and
each ``persist`` writes what was placed; only the last ``WINDOW_S`` stay open to late placements,
everything older is final on disk. A replica that takes the session over re-opens the file, loads
its open window back and carries on, so a handover loses nothing and a crash loses at most what was
placed since the last persist (the caller's part of it is re-read from the stream).

Positions are session time: seconds since the session opened, times the session's speed, so a
conversation run faster than real time still records at its natural pace.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from proto.events import FRAME_MS, USER_RATE, UserAudio

logger = logging.getLogger("voicebus.egress")

HEADER_BYTES = 44
#: Audio this close to the end of the previous piece on a channel continues it (timer jitter, rounding).
SNAP_S = 0.005
#: How long placed audio stays open to later placements before it is final on disk.
WINDOW_S = 1.0
#: A caller frame this far from where its stream says it belongs starts a new run at its arrival time.
REANCHOR_S = 0.25
#: A caller frame stamped this far ahead of this replica's clock has a broken timestamp; it is left out
#: (placing it would fill the file with silence up to it).
FUTURE_S = 5.0
_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")


class SessionTime:
    """Maps wall-clock and monotonic instants to session time (seconds from the opening, x speed)."""

    def __init__(self, opened_ns: int, speed: float) -> None:
        self.opened_ns = opened_ns or time.time_ns()
        self.speed = speed
        self._mono_to_wall = time.time_ns() - time.monotonic_ns()

    def of_wall(self, ns: int) -> float:
        """Session time of a wall-clock instant (an event's ``ts``)."""
        return (ns - self.opened_ns) / 1e9 * self.speed

    def of_monotonic(self, seconds: float) -> float:
        """Session time of a monotonic instant (the playout timeline's clock)."""
        return self.of_wall(int(seconds * 1e9) + self._mono_to_wall)


def _header(rate: int, channels: int, frames: int) -> bytes:
    data = frames * channels * 2
    return _HEADER.pack(
        b"RIFF", 36 + data, b"WAVE", b"fmt ", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16,
        b"data", data,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Piece:
    offset: int
    data: bytes
    frames: int  # length of the file's audio once the piece is written


class WavTrack:
    """A s16le WAV that grows while audio is placed into it at sample positions, per channel."""

    def __init__(self, path: Path, rate: int, channels: int) -> None:
        self.path, self.rate, self.channels = path, rate, channels
        self.base = 0  # first sample still open; earlier ones are final on disk
        self.extent = 0  # end of what was placed
        self._snap = int(SNAP_S * rate)
        self._ends = [-2 * self._snap] * channels  # nothing placed yet: nothing to continue
        self._buf = np.zeros((rate, channels), dtype="<i2")
        self._window = int(WINDOW_S * rate)
        self._writing: asyncio.Future[None] | None = None

    async def open(self, resume: bool) -> None:
        """Start the file, or (``resume``) continue the one a predecessor was writing."""
        await asyncio.to_thread(self._open, resume)

    def _open(self, resume: bool) -> None:
        frames = self._existing() if resume else None
        if frames is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(_header(self.rate, self.channels, 0))
            return
        self.base, self.extent = max(0, frames - self._window), frames
        with open(self.path, "rb") as f:
            f.seek(HEADER_BYTES + self.base * self.channels * 2)
            tail = np.frombuffer(f.read((frames - self.base) * self.channels * 2), dtype="<i2")
        self._reserve(frames - self.base)
        self._buf[: frames - self.base] = tail.reshape(-1, self.channels)

    def _existing(self) -> int | None:
        """Frames in the file a predecessor wrote, if it is one of ours in this format."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(HEADER_BYTES)
                size = f.seek(0, 2)
        except FileNotFoundError:
            return None
        if len(head) == HEADER_BYTES:
            riff, _, wave, fmt, _, pcm, channels, rate, _, _, bits, data, _ = _HEADER.unpack(head)
            ours = (riff, wave, fmt, data, pcm, bits) == (b"RIFF", b"WAVE", b"fmt ", b"data", 1, 16)
            if ours and (channels, rate) == (self.channels, self.rate):
                return int((size - HEADER_BYTES) // (2 * channels))
        logger.warning(
            "%s is not a %d Hz %d-channel voicebus WAV; starting it over", self.path, self.rate, self.channels
        )
        return None

    def place(self, channel: int, pos: int, samples: np.ndarray) -> None:
        """Put ``samples`` at sample ``pos`` of ``channel``; what falls before the open window is dropped."""
        if abs(pos - self._ends[channel]) <= self._snap:
            pos = self._ends[channel]
        if pos < self.base:
            samples, pos = samples[self.base - pos :], self.base
        if not len(samples):
            return
        end = pos + len(samples)
        self._reserve(end - self.base)
        self._buf[pos - self.base : end - self.base, channel] = samples
        self._ends[channel] = end
        self.extent = max(self.extent, end)

    def place_at(self, channel: int, at_s: float, pcm: bytes) -> None:
        """Put s16le ``pcm`` at session time ``at_s``."""
        self.place(channel, round(at_s * self.rate), np.frombuffer(pcm, dtype="<i2"))

    def _reserve(self, frames: int) -> None:
        if frames > len(self._buf):
            grown = np.zeros((max(frames, 2 * len(self._buf)), self.channels), dtype="<i2")
            grown[: len(self._buf)] = self._buf
            self._buf = grown

    async def persist(self, final: bool = False) -> None:
        """Write what was placed, in a thread; audio older than the open window becomes final.

        Writes go out one after the other even when the caller of an earlier one was cancelled: a
        stale piece must never land after a newer one.
        """
        if self._writing is not None and not self._writing.done():
            await asyncio.wait([self._writing])
        piece = self._take(final)
        self._writing = asyncio.get_running_loop().run_in_executor(None, self._write, piece)
        await asyncio.shield(self._writing)

    def _take(self, final: bool) -> _Piece:
        n = self.extent - self.base
        piece = _Piece(HEADER_BYTES + self.base * self.channels * 2, self._buf[:n].tobytes(), self.extent)
        keep_from = n if final else max(0, n - self._window)
        kept = self._buf[keep_from:n].copy()
        self._buf[:] = 0
        self._buf[: len(kept)] = kept
        self.base += keep_from
        return piece

    def _write(self, piece: _Piece) -> None:
        with open(self.path, "r+b") as f:
            f.seek(piece.offset)
            f.write(piece.data)
            f.seek(0)
            f.write(_header(self.rate, self.channels, piece.frames))


class Recording:
    """The call as heard, in stereo: the caller on the left, the agent on the right."""

    CALLER, AGENT = 0, 1

    def __init__(self, path: Path, rate: int, clock: SessionTime) -> None:
        self.track = WavTrack(path, rate, channels=2)
        self.rate, self.clock = rate, clock
        self._frame = rate * FRAME_MS // 1000
        self._resampler: soxr.ResampleStream | None = None
        self._run = (0, 0)  # (position, frame index) where the current run of caller frames started
        self._next_index = -1
        self._pos = 0  # where the resampler's next output goes
        self._last_seq = 0
        #: Stream sequence of the last caller frame placed in full (the resampler holds back the end
        #: of the latest one): a successor re-reads the caller's audio after it.
        self.caller_seq = 0

    def resume_after(self, seq: int) -> None:
        """The caller's audio up to stream sequence ``seq`` is in the file already."""
        self.caller_seq = self._last_seq = seq

    def caller(self, audio: UserAudio, seq: int) -> bool:
        """Place caller frames where they were heard; False if their timestamp is from the future.

        Frames follow each other in stream order from an anchor: the time the run's first frame
        reached the ingress. A gap in the indices or a source drifting from its timestamps starts a
        new run. An event is stamped when its last frame went out: its first frame was heard the
        audio before that earlier.
        """
        heard_s = self.clock.of_wall(audio.ts) - (audio.frames - 1) * FRAME_MS / 1000
        if heard_s > self.clock.of_wall(time.time_ns()) + FUTURE_S * self.clock.speed:
            return False
        heard = round(heard_s * self.rate)
        start, index0 = self._run
        expected = start + (audio.index - index0) * self._frame
        if (
            self._resampler is None
            or audio.index != self._next_index
            or abs(heard - expected) > REANCHOR_S * self.rate
        ):
            self._finish_run()
            self._resampler = soxr.ResampleStream(USER_RATE, self.rate, 1, dtype="int16")
            self._run, self._pos = (heard, audio.index), heard
        out = self._resampler.resample_chunk(np.frombuffer(audio.pcm, dtype="<i2"))
        self.track.place(self.CALLER, self._pos, out)
        self._pos += len(out)
        self._next_index, self.caller_seq, self._last_seq = audio.index + audio.frames, self._last_seq, seq
        return True

    def agent(self, pcm: bytes, at_s: float) -> None:
        """Place an agent frame at the session time it started playing."""
        self.track.place_at(self.AGENT, at_s, pcm)

    def _finish_run(self) -> None:
        if self._resampler is not None:
            self.track.place(
                self.CALLER, self._pos, self._resampler.resample_chunk(np.zeros(0, "<i2"), last=True)
            )
            self._resampler = None

    async def persist(self, final: bool = False) -> None:
        """Write what was heard so far (``final``: the call is over, everything)."""
        if final:
            self._finish_run()
        await self.track.persist(final)
