"""Caller audio in whatever shape an edge has it, to the 16 kHz mono 20 ms frames every stage expects.

Samples are s16le numpy arrays throughout: audio already at 16 kHz mono passes through untouched
(bit-exact, so a frame re-published after a takeover is the same frame), anything else is downmixed
and resampled by soxr as a stream, keeping its filter state from one chunk to the next.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soxr

from proto.events import FRAME_MS, USER_RATE

Samples = npt.NDArray[np.int16]
FRAME_SAMPLES = USER_RATE * FRAME_MS // 1000
MIN_RATE, MAX_RATE = 8_000, 48_000
PCM = np.dtype("<i2")
NO_SAMPLES: Samples = np.zeros(0, PCM)


class WavError(ValueError):
    """A WAV file the ingress cannot play; the message says why, for the session's error report."""


def to_mono(pcm: bytes, channels: int) -> Samples:
    """Interleaved s16le ``pcm`` as one channel (the mean of the channels)."""
    samples: Samples = np.frombuffer(pcm, PCM)
    if channels == 1:
        return samples
    mixed: Samples = (samples.reshape(-1, channels).astype(np.int32).sum(axis=1) // channels).astype(PCM)
    return mixed


class Resampler:
    """Caller audio to 16 kHz mono, one chunk at a time; a change of rate flushes and starts over."""

    def __init__(self, quality: str) -> None:
        self.quality = quality
        self._rate = USER_RATE
        self._stream: soxr.ResampleStream | None = None

    def push(self, pcm: bytes, rate: int, channels: int, *, last: bool = False) -> Samples:
        """16 kHz samples of ``pcm`` so far; the filter holds back a few ms until more comes or ``last``."""
        samples = to_mono(pcm, channels)
        head = NO_SAMPLES
        if rate != self._rate:
            head = self._flush()
            self._rate = rate
            if rate != USER_RATE:
                self._stream = soxr.ResampleStream(rate, USER_RATE, 1, dtype="int16", quality=self.quality)
        if self._stream is not None:
            samples = self._stream.resample_chunk(samples, last=last)
            if last:
                self._stream.clear()
        return np.concatenate((head, samples)) if len(head) else samples

    def _flush(self) -> Samples:
        if self._stream is None:
            return NO_SAMPLES
        tail: Samples = self._stream.resample_chunk(NO_SAMPLES, last=True)
        self._stream = None
        return tail


class Framer:
    """Cuts a stream of 16 kHz samples into 20 ms frames, keeping the remainder for the next chunk."""

    def __init__(self, pending: bytes = b"") -> None:
        self._pending: Samples = np.frombuffer(pending, PCM).copy()

    @property
    def pending(self) -> bytes:
        """Samples not yet a whole frame (saved with the session's state)."""
        return self._pending.tobytes()

    def push(self, samples: Samples, *, pad: bool = False) -> list[Samples]:
        """Whole frames of what has arrived; with ``pad``, the remainder too, completed with silence."""
        buffered = np.concatenate((self._pending, samples)) if len(self._pending) else samples
        whole = len(buffered) // FRAME_SAMPLES * FRAME_SAMPLES
        frames = [buffered[i : i + FRAME_SAMPLES] for i in range(0, whole, FRAME_SAMPLES)]
        rest = buffered[whole:]
        if pad and len(rest):
            frames.append(np.concatenate((rest, np.zeros(FRAME_SAMPLES - len(rest), PCM))))
            rest = NO_SAMPLES
        self._pending = rest.copy()
        return frames


def read_wav(path: Path) -> Samples:
    """A 16-bit PCM WAV file (8-48 kHz, any channels) as 16 kHz mono, padded to whole frames."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            if width != 2:
                raise WavError(f"{path}: {8 * width}-bit samples; the ingress plays 16-bit PCM WAV files")
            if not MIN_RATE <= rate <= MAX_RATE:
                raise WavError(f"{path}: sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
            pcm = w.readframes(w.getnframes())
    except FileNotFoundError:
        raise WavError(f"{path}: no such file") from None
    except (wave.Error, EOFError) as e:
        raise WavError(f"{path}: not a PCM WAV file ({e})") from None
    except OSError as e:
        raise WavError(f"{path}: cannot read ({e.strerror or e})") from None
    samples = to_mono(pcm[: len(pcm) // (2 * channels) * 2 * channels], channels)
    if rate != USER_RATE:
        samples = soxr.resample(samples, rate, USER_RATE, quality="HQ")
    pad = -len(samples) % FRAME_SAMPLES
    return np.concatenate((samples, np.zeros(pad, PCM))).astype(PCM)
