"""The agent's voice to a browser: a WHEP peer connection in the replica that owns the session.

The gateway relays the browser's offer over the bus and this replica answers it (``services.webrtc``).
The playout hands each frame over when it is due; the outgoing track sends it at its next 20 ms tick,
so at most a frame waits here, and a cut reply (``flush``) is silent from the next packet on.
"""

from __future__ import annotations

import asyncio
from typing import Any

from proto import events as ev
from services.egress.sinks import Sink
from services.runtime.service import SessionContext
from services.webrtc.config import WebRtcConfig
from services.webrtc.peer import PeerLeg
from services.webrtc.voice import AgentTrack, AgentVoice


class WebRtcSink(Sink):
    """The session's agent audio as a WebRTC track (``spec.sink == "webrtc"``)."""

    def __init__(self, ctx: SessionContext[Any], settings: WebRtcConfig) -> None:
        self.ctx = ctx
        self.voice = AgentVoice(ctx.spec.output_rate, settings.out_queue_frames)
        self.leg = PeerLeg(ctx.bus, "egress", ctx.session, send=lambda: AgentTrack(self.voice))

    async def open(self, resume: bool) -> None:
        """Answer the browser's offers for as long as this replica serves the session."""
        await self.leg.start()
        self.ctx.spawn(self._hold(), "webrtc")

    async def _hold(self) -> None:
        """Hang up when the session's tasks are cancelled (it ended, or moved to another replica)."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.leg.close()

    async def play(self, frame: ev.AgentAudioFrame, at_s: float) -> None:
        """Queue the frame for the track's next tick."""
        self.voice.push(frame.pcm)

    async def flush(self) -> None:
        """Drop what is queued: the caller hears nothing more of the cut reply."""
        self.voice.flush()
