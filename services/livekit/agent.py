"""The agent in the session's room: its voice, its captions and its state, kept across rejoins.

The egress owner joins the room as the agent (one identity per session: a successor replica replaces
it in the room), publishes the voice track, and from then on plays each frame the playout hands over,
captions what is said on both sides and shows whether the agent is listening, thinking or speaking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from livekit import rtc
from prometheus_client import Counter

from proto import events as ev
from services.livekit.captions import LISTENING, SPEAKING, THINKING, RoomCaptions
from services.livekit.config import LiveKitConfig
from services.livekit.link import RoomLink
from services.livekit.room import RoomTarget
from services.livekit.tokens import agent_token
from services.livekit.voice import AgentVoice

logger = logging.getLogger("voicebus.livekit")

unheard = Counter(
    "vb_livekit_unheard_frames_total", "Agent frames played while the agent was not in its room (lost)"
)


class AgentParticipant:
    """One session's agent in its LiveKit room."""

    def __init__(self, cfg: LiveKitConfig, session: str, target: RoomTarget, output_rate: int) -> None:
        self.cfg, self.target = cfg, target
        self.voice = AgentVoice(output_rate, cfg.queue_ms)
        self.captions = RoomCaptions(cfg, session, target)
        self.link = RoomLink(
            cfg,
            role="agent",
            room=target.room,
            token=lambda: agent_token(cfg, target.room, session),
            auto_subscribe=False,
            setup=self._setup,
            joined=self._joined,
        )
        self._away = False
        self._publication: rtc.LocalTrackPublication | None = None

    async def run(self) -> int:
        """Be in the room until it ends or ``close``; returns the disconnect reason.

        Raises ``RoomUnreachable`` when the room cannot be (re)joined.
        """
        captions = asyncio.create_task(self.captions.run(), name="livekit-captions")
        try:
            return await self.link.run()
        finally:
            captions.cancel()
            await asyncio.gather(captions, return_exceptions=True)

    async def joined(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the agent to be in the room with its voice published."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.link.connected.wait(), timeout_s)
        return self.link.connected.is_set()

    async def ready(self, timeout_s: float) -> bool:
        """``joined``, and if the caller is in the room, heard by them: audio sent before is lost.

        Bounded by ``timeout_s`` in all; an agent sent into a room before its caller does not wait.
        """
        deadline = time.monotonic() + timeout_s
        if not await self.joined(timeout_s) or self._publication is None or self.link.room is None:
            return False
        if self.target.caller(self.cfg, self.link.room) is None:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._publication.wait_for_subscription(), deadline - time.monotonic())
            return True
        return False

    def _setup(self, room: rtc.Room) -> None:
        room.on("reconnected", self.captions.restate)

    async def _joined(self, room: rtc.Room) -> None:
        self._publication = await self.voice.publish(room)
        self.captions.attach(room, self._publication.sid)

    # --- what the egress does -----------------------------------------------------------------------

    async def play(self, frame: ev.AgentAudioFrame) -> None:
        """Send one frame now (the playout paces them) and caption the words it starts."""
        if not self.link.connected.is_set():
            unheard.inc()
            if not self._away:
                logger.warning(
                    "the agent is not in room %s: its audio is lost until it rejoins", self.target.room
                )
            self._away = True
        else:
            self._away = False
        await self.voice.play(frame.pcm)
        self.captions.agent_played(frame)

    def flush(self) -> None:
        """A reply was cut: drop its audio still queued in the track."""
        self.voice.flush()

    def on_event(self, event: ev.Event) -> None:
        """Conversation events that show in the room: the caller's words, the agent's state."""
        match event:
            case ev.Transcript():
                self.captions.caller_said(event)
            case ev.UserTurnEnded():
                self.captions.set_state(THINKING)
            case ev.PlayoutStarted() | ev.PlayoutResumed():
                self.captions.set_state(SPEAKING)
            case ev.PlayoutPaused():
                self.captions.set_state(LISTENING)
            case ev.PlayoutStopped():
                self.captions.agent_stopped(event)
                self.captions.set_state(LISTENING)

    async def close(self) -> None:
        """Leave the room and release the voice."""
        await self.link.close()
        await self.voice.aclose()
