"""The agent in the session's LiveKit room: its voice, captions of both sides, its state.

``spec.sink_uri`` names the room (``<room>`` or ``<room>?participant=<identity>``). The egress owner
joins as the agent (``services.livekit.agent``) for as long as it serves the session: the playout
hands each frame over when it is due, a cut reply's audio still queued in the track is dropped, and the
conversation's events caption it and set the agent's state.
"""

from __future__ import annotations

import logging
from typing import Any

from proto import events as ev
from services.egress.sinks import Sink, UnsupportedSink
from services.livekit.agent import AgentParticipant
from services.livekit.config import LiveKitConfig
from services.livekit.link import RoomUnreachable
from services.livekit.room import BadRoomUri, RoomTarget
from services.runtime.service import SessionContext

logger = logging.getLogger("voicebus.egress")


class LiveKitSink(Sink):
    """The session's agent audio as a track in its LiveKit room (``spec.sink == "livekit"``)."""

    def __init__(self, ctx: SessionContext[Any], cfg: LiveKitConfig) -> None:
        if not cfg.configured:
            raise UnsupportedSink("LiveKit is not configured here (LIVEKIT_URL)")
        try:
            target = RoomTarget.parse(ctx.spec.sink_uri)
        except BadRoomUri as e:
            raise UnsupportedSink(str(e)) from None
        self.ctx, self.cfg = ctx, cfg
        self.agent = AgentParticipant(cfg, ctx.session, target, ctx.spec.output_rate)

    async def open(self, resume: bool) -> None:
        """Join the room (a successor takes its predecessor's place); wait a little to be heard.

        The first reply (a greeting) plays as soon as the session starts: it would be lost on a caller
        whose client does not receive the agent's track yet.
        """
        self.ctx.spawn(self._be_there(), "livekit")
        if not await self.agent.ready(self.cfg.join_timeout_s):
            logger.warning(
                "the agent is not heard in room %s yet; the session goes on", self.agent.target.room
            )

    async def _be_there(self) -> None:
        """Stay in the room until the session's tasks are cancelled (it ended, or moved elsewhere)."""
        try:
            await self.agent.run()
        except RoomUnreachable as e:
            await self.ctx.report("provider", f"livekit sink: {e}", retryable=True)
        finally:
            await self.agent.close()

    async def play(self, frame: ev.AgentAudioFrame, at_s: float) -> None:
        """Send the frame now and caption the words it starts."""
        await self.agent.play(frame)

    async def flush(self) -> None:
        """Drop what the track still holds of a cut reply."""
        self.agent.flush()

    def on_event(self, event: ev.Event) -> None:
        """The caller's transcripts and the turn and playout events: captions and the agent's state."""
        self.agent.on_event(event)
