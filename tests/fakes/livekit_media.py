"""Audio for the fake LiveKit server: the caller's microphone it sends, and what it hears from clients.

The caller is a tone (its pitch identifies it at the far end) or a WAV file, sent in real time as
48 kHz mono 20 ms frames; both are timed so a test can measure latency from the moment a sample was
sent. What the server hears is kept as 48 kHz mono samples with the arrival time of each frame.
"""

from __future__ import annotations

import asyncio
import fractions
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import soxr
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

RATE = 48_000
FRAME = RATE // 50  # 20 ms
LEVEL = 0.3


def tone(seconds: float, hz: float, rate: int = RATE, level: float = LEVEL) -> npt.NDArray[np.int16]:
    """A sine tone as s16 samples."""
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * level * 32767).astype(np.int16)


def read_wav(path: str) -> npt.NDArray[np.int16]:
    """A 16-bit WAV file as 48 kHz mono."""
    with wave.open(path, "rb") as w:
        rate, channels = w.getframerate(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, channels).mean(axis=1)
    return soxr.resample(pcm.astype(np.int16), rate, RATE).astype(np.int16)


def rms(pcm: npt.NDArray[np.int16]) -> float:
    """Root mean square in full-scale units (0..1)."""
    return float(np.sqrt(np.mean((pcm.astype(np.float64) / 32768) ** 2))) if len(pcm) else 0.0


def dominant_hz(pcm: npt.NDArray[np.int16], rate: int) -> float:
    """The strongest frequency of ``pcm``."""
    if len(pcm) < 2:
        return 0.0
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[int(np.argmax(spectrum))])


class CallerTrack(MediaStreamTrack):
    """The caller's microphone, paced in real time from ``t0`` (``start()``, asked at the first frame).

    Every subscriber gets its own track on the same clock, so sample ``n`` leaves every one of them at
    ``t0 + n / RATE``: a WAV (then silence), or a tone at ``hz``, continuous or in bursts of
    ``burst_ms`` every ``period_ms`` (burst ``k`` starts at ``t0 + k * period_ms``). Like a live
    microphone, it never sends audio late: what fell due while the connection was being set up is
    skipped, not sent in a burst.
    """

    kind = "audio"

    def __init__(
        self, start: Callable[[], float], *, hz: float, wav: str = "", burst_ms: int = 0, period_ms: int = 0
    ) -> None:
        super().__init__()
        self.start, self.hz = start, hz
        self.t0: float | None = None
        self.samples = read_wav(wav) if wav else None
        self.burst, self.period = burst_ms * RATE // 1000, period_ms * RATE // 1000
        self.sent = 0

    def _chunk(self) -> npt.NDArray[np.int16]:
        n = self.sent + np.arange(FRAME)
        if self.samples is not None:
            chunk = self.samples[self.sent : self.sent + FRAME]
            return np.concatenate((chunk, np.zeros(FRAME - len(chunk), np.int16)))
        wave_ = np.sin(2 * np.pi * self.hz * n / RATE) * LEVEL * 32767
        if self.period:
            wave_ = np.where(n % self.period < self.burst, wave_, 0.0)
        return wave_.astype(np.int16)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.t0 is None:
            self.t0 = self.start()
        behind = time.time() - (self.t0 + self.sent / RATE)
        if behind > FRAME / RATE:  # a live microphone does not wait for the connection: that audio is gone
            self.sent += int(behind * RATE) // FRAME * FRAME
        await asyncio.sleep(max(0.0, self.t0 + self.sent / RATE - time.time()))
        frame = AudioFrame.from_ndarray(self._chunk().reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self.sent, fractions.Fraction(1, RATE)
        self.sent += FRAME
        return frame


@dataclass
class Heard:
    """A client's published audio as the server decoded it."""

    chunks: list[tuple[int, npt.NDArray[np.int16]]] = field(default_factory=list)  # (arrival ns, 48 kHz)

    def add(self, at_ns: int, pcm: npt.NDArray[np.int16], rate: int) -> None:
        if rate != RATE:
            pcm = soxr.resample(pcm, rate, RATE).astype(np.int16)
        self.chunks.append((at_ns, pcm))

    def pcm(self) -> npt.NDArray[np.int16]:
        return np.concatenate([c for _, c in self.chunks]) if self.chunks else np.zeros(0, np.int16)

    def loud_frames(self, threshold: float = 0.02) -> list[tuple[int, npt.NDArray[np.int16]]]:
        return [(at, c) for at, c in self.chunks if rms(c) >= threshold]

    def summary(self) -> dict[str, Any]:
        """What tests assert on: how much, how loud, what pitch, and when the sound started."""
        loud = self.loud_frames()
        sound = np.concatenate([c for _, c in loud]) if loud else np.zeros(0, np.int16)
        return {
            "frames": len(self.chunks),
            "loud_frames": len(loud),
            "rms": rms(sound),
            "dominant_hz": dominant_hz(sound, RATE),
            "first_loud_ns": loud[0][0] if loud else 0,
            "onsets_ns": onsets(self.chunks),
        }


def onsets(chunks: list[tuple[int, npt.NDArray[np.int16]]], threshold: float = 0.02) -> list[int]:
    """Arrival times of the frames where sound starts after at least 100 ms of silence."""
    found, quiet = [], 5
    for at, chunk in chunks:
        if rms(chunk) >= threshold:
            if quiet >= 5:
                found.append(at)
            quiet = 0
        else:
            quiet += 1
    return found
