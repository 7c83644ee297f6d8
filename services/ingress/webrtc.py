"""The caller's microphone from a browser: a WHIP peer connection in the replica that owns the session.

The gateway relays the browser's offer over the bus; this replica answers it (``services.webrtc``),
and aiortc decodes the caller's Opus into 20 ms frames at 48 kHz stereo. Each is converted to 16 kHz
mono here and delivered as it arrives, one caller frame per packet. The caller's audio is silenced for
the first moments of each agent reply (the echo guard), and a session whose microphone stays
disconnected ends as a hang-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from aiortc import MediaStreamTrack
from av import AudioFrame, AudioResampler

from proto import events as ev
from proto.events import USER_RATE
from proto.state import SourcePosition
from services.ingress.audio import FRAME_SAMPLES, PCM, Samples
from services.ingress.config import IngressConfig
from services.ingress.sources import CallerSource, Deliver
from services.runtime.service import SessionContext
from services.webrtc.peer import PeerLeg

logger = logging.getLogger("voicebus.ingress")


class Uplink:
    """Decoded Opus frames (48 kHz, stereo) to 16 kHz mono, every packet's worth at once.

    libswresample returns each chunk's samples right away, less a millisecond of filter delay (soxr's
    better filters deliver in bursts, holding a frame back now and then). Silence in front of the first
    output makes that first delivery a whole frame, so that each packet completes exactly one caller
    frame instead of leaving most of one waiting for the next packet.
    """

    def __init__(self) -> None:
        self._resampler = AudioResampler(format="s16", layout="mono", rate=USER_RATE)
        self._primed = False

    def convert(self, frame: AudioFrame) -> Samples:
        """16 kHz mono samples of one decoded frame."""
        chunks = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        samples: Samples = np.concatenate(chunks).astype(PCM) if chunks else np.zeros(0, PCM)
        if not self._primed and len(samples):
            self._primed = True
            lead = -len(samples) % FRAME_SAMPLES
            samples = np.concatenate((np.zeros(lead, PCM), samples))
        return samples


class EchoGuard:
    """Silences the caller's audio for ``guard_ms`` from the moment the agent starts (or resumes) speaking.

    The browser's echo canceller needs a moment to lock onto the agent's voice; until it has, the
    agent's first words can come back through the caller's microphone and sound like a barge-in. What
    arrives in that window is replaced by silence before the VAD sees it, so no stage acts on it: the
    egress does not pause, the dialogue does not interrupt, STT transcribes nothing. A caller who does
    start talking then is heard from the end of the window on.
    """

    def __init__(self, guard_ms: float) -> None:
        self.guard_ns = int(guard_ms * 1_000_000)
        self._since = 0
        #: Frames silenced so far.
        self.silenced = 0

    def agent_started(self, at_ns: int) -> None:
        """The agent's audio started leaving the egress at wall-clock ``at_ns``."""
        self._since = max(self._since, at_ns)

    def filter(self, samples: Samples, arrived_ns: int) -> Samples:
        """``samples`` as the VAD should get them."""
        if self.guard_ns and self._since <= arrived_ns < self._since + self.guard_ns:
            self.silenced += 1
            return np.zeros_like(samples)
        return samples


class WebRtcSource(CallerSource):
    """The caller's microphone over WebRTC (``spec.source == "webrtc"``)."""

    def __init__(self, ctx: SessionContext[Any], cfg: IngressConfig, deliver: Deliver) -> None:
        super().__init__(ctx, cfg, deliver)
        self.settings = cfg.webrtc
        self.guard = EchoGuard(self.settings.echo_guard_ms)
        self.leg = PeerLeg(
            ctx.bus,
            "ingress",
            ctx.session,
            receive=self._receive,
            jitter_prefetch=self.settings.jitter_prefetch,
            on_state=self._connection,
        )
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()

    async def start(self, position: SourcePosition) -> None:
        """Answer the browser's offers; the caller has ``hangup_s`` to connect."""
        await self.leg.start()
        self.ctx.spawn(self._hang_up_when_gone(), "webrtc-hangup")

    async def on_event(self, event: ev.Event) -> None:
        """The agent starting to speak opens the echo guard."""
        match event:
            case ev.PlayoutStarted(ts=ts) | ev.PlayoutResumed(ts=ts):
                self.guard.agent_started(ts)

    async def close(self) -> None:
        """Hang up the peer connection."""
        await self.leg.close()

    async def _receive(self, track: MediaStreamTrack) -> None:
        uplink = Uplink()  # a new connection starts a new decoder and resampler
        while True:
            frame = await track.recv()
            arrived_ns = time.time_ns()
            assert isinstance(frame, AudioFrame)
            await self.deliver(self.guard.filter(uplink.convert(frame), arrived_ns), arrived_ns, False)

    def _connection(self, state: str) -> None:
        if state == "connected":
            self._lost.clear()
            self._connected.set()
        elif state in ("failed", "closed"):
            logger.info("caller's microphone %s in %s", state, self.ctx.session)
            self._connected.clear()
            self._lost.set()

    async def _hang_up_when_gone(self) -> None:
        """End the session once the microphone has been away for ``hangup_s`` (or never came)."""
        while True:
            try:
                async with asyncio.timeout(self.settings.hangup_s):
                    await self._connected.wait()
            except TimeoutError:
                logger.info(
                    "no microphone for %g s in %s: ending the session",
                    self.settings.hangup_s,
                    self.ctx.session,
                )
                await self.ctx.end("hangup")
                return
            await self._lost.wait()
