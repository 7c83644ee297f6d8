"""The agent's voice as a WebRTC track: played frames leave within one tick, an interrupt empties the rest.

The egress playout hands each frame over when it is due (``AgentVoice.push``); the peer connection's
sender pulls the track every 20 ms on its own clock (``AgentTrack.recv``), sending silence when no
frame is waiting. So the queue between them holds at most a frame or so, and ``flush`` (a cut reply)
takes effect at the next packet. Frames go out at 48 kHz and in stereo, as the Opus encoder takes
them: at another rate its resampler would hold back a whole frame, and a mono frame would be upmixed
3 dB quieter. Other rates are converted here with
libswresample, which returns every chunk's worth at once (soxr's better filters deliver in bursts of
two or three frames, which would leave ticks empty).
"""

from __future__ import annotations

import asyncio
import fractions
import time

import numpy as np
import numpy.typing as npt
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, AudioResampler
from prometheus_client import Counter

from proto.events import FRAME_MS

OUT_RATE = 48_000
OUT_SAMPLES = OUT_RATE * FRAME_MS // 1000
PTIME_S = FRAME_MS / 1000
#: Samples added in front of resampled audio so that rounding in the resampler never leaves a tick
#: short of a whole frame (2 ms).
MARGIN = OUT_RATE // 500
#: A tick this late (the event loop stalled) restarts the schedule instead of sending a burst.
MAX_LATE_S = 0.06
PCM = np.dtype("<i2")
Samples = npt.NDArray[np.int16]

dropped_frames = Counter(
    "vb_webrtc_out_dropped_frames_total",
    "Agent frames dropped because the outgoing track's queue was full (nobody pulling, or fed too fast)",
)


class AgentVoice:
    """Agent audio waiting for the next tick of the outgoing track: a small FIFO of 48 kHz samples."""

    def __init__(self, rate: int, max_frames: int) -> None:
        self.rate = rate
        self._max = max_frames * OUT_SAMPLES
        self._fifo: Samples = np.zeros(0, PCM)
        self._resampler: AudioResampler | None = None
        self._pushed = 0  # samples fed to the resampler, for its timestamps

    @property
    def queued_ms(self) -> float:
        """Audio waiting to be sent."""
        return len(self._fifo) * 1000 / OUT_RATE

    def push(self, pcm: bytes) -> None:
        """Queue one played frame (mono s16le at ``rate``); beyond the bound, the oldest audio goes."""
        samples: Samples = np.frombuffer(pcm, PCM)
        if self.rate != OUT_RATE:
            samples = self._resample(samples)
        fifo = np.concatenate((self._fifo, samples))
        if (excess := len(fifo) - self._max) > 0:
            dropped_frames.inc(-(-excess // OUT_SAMPLES))
            fifo = fifo[excess:]
        self._fifo = fifo

    def _resample(self, samples: Samples) -> Samples:
        primed = self._resampler is not None
        if self._resampler is None:
            self._resampler = AudioResampler(format="s16", layout="mono", rate=OUT_RATE)
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = self.rate, self._pushed
        frame.time_base = fractions.Fraction(1, self.rate)
        self._pushed += len(samples)
        chunks = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        out: Samples = np.concatenate(chunks) if chunks else np.zeros(0, PCM)
        if not primed:
            # the filter holds a few samples back: lead with silence so that each tick finds a whole frame
            lead = max(0, OUT_SAMPLES + MARGIN - len(self._fifo) - len(out))
            out = np.concatenate((np.zeros(lead, PCM), out))
        return out

    def pop(self) -> bytes | None:
        """The next 20 ms to send, or None if no whole frame is waiting."""
        if len(self._fifo) < OUT_SAMPLES:
            return None
        frame, self._fifo = self._fifo[:OUT_SAMPLES], self._fifo[OUT_SAMPLES:]
        return frame.tobytes()

    def flush(self) -> None:
        """Drop everything queued, the resampler's held-back samples included."""
        self._fifo = np.zeros(0, PCM)
        self._resampler = None
        self._pushed = 0


class AgentTrack(MediaStreamTrack):
    """The outgoing audio track of one peer connection, reading an ``AgentVoice`` every 20 ms."""

    kind = "audio"

    def __init__(self, voice: AgentVoice) -> None:
        super().__init__()
        voice.flush()  # a new connection starts from what plays now, not what waited for the last one
        self.voice = voice
        self._start: float | None = None
        self._sent = 0
        self._silence = bytes(OUT_SAMPLES * 2)

    async def recv(self) -> AudioFrame:
        """The next 20 ms frame, on an absolute schedule: the agent's audio, or silence."""
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            due = self._start + self._sent * PTIME_S
            if now - due > MAX_LATE_S:
                self._start = now - self._sent * PTIME_S
            elif due > now:
                await asyncio.sleep(due - now)
        mono = np.frombuffer(self.voice.pop() or self._silence, PCM)
        frame = AudioFrame.from_ndarray(np.repeat(mono, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = OUT_RATE
        frame.pts = self._sent * OUT_SAMPLES
        frame.time_base = fractions.Fraction(1, OUT_RATE)
        self._sent += 1
        return frame
