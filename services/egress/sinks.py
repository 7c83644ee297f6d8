"""Where played frames go: the session's media edge.

The playout hands a sink each frame at the moment it is due, so a sink does not pace or queue: it
passes the frame on (``bus``: the edge's speaker on ``media.out``) or keeps it where it was heard
(``file``: a WAV of the agent's track), or sends it into a room (``livekit``: the agent's voice track).
Edges that buffer audio themselves (a LiveKit ``AudioSource``, a WebRTC track) implement ``flush`` to
drop what they hold when a reply is cut; edges that show the conversation (captions, the agent's
state) follow its events in ``on_event``.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any

from proto import events as ev
from proto import subjects as sj
from services.egress.recording import WavTrack
from services.livekit.agent import AgentParticipant
from services.livekit.config import LiveKitConfig
from services.livekit.link import RoomUnreachable
from services.livekit.room import BadRoomUri, RoomTarget
from services.runtime.service import SessionContext

logger = logging.getLogger("voicebus.egress")


class UnsupportedSink(ValueError):
    """The session asks for a sink this egress cannot serve."""


class Sink(abc.ABC):
    """The agent's media output of one session."""

    async def open(self, resume: bool) -> None:
        """Get ready; ``resume``: continue what the session's previous egress replica started."""

    @abc.abstractmethod
    async def play(self, frame: ev.AgentAudioFrame, at_s: float) -> None:
        """Output ``frame`` now; it starts at session time ``at_s``."""

    async def flush(self) -> None:
        """Drop audio handed over but not heard yet: a reply was cut."""

    async def persist(self, final: bool = False) -> None:
        """Make what has played durable (``final``: the call is over)."""

    def on_event(self, event: ev.Event) -> None:
        """A conversation event of the session (transcripts, turns, playout), in stream order."""

    async def close(self) -> None:
        """Let go of the edge: the call is over, or another replica serves the session now."""


class BusSink(Sink):
    """Each played frame, unchanged, on the session's ``media.out`` for a bus-attached edge."""

    def __init__(self, ctx: SessionContext[Any]) -> None:
        self.ctx = ctx

    async def play(self, frame: ev.AgentAudioFrame, at_s: float) -> None:
        await self.ctx.publish(sj.MEDIA_OUT, frame)


class FileSink(Sink):
    """The agent's track as a mono WAV at the output rate, each frame at the time it played."""

    def __init__(self, path: Path, rate: int) -> None:
        self.track = WavTrack(path, rate, channels=1)

    async def open(self, resume: bool) -> None:
        await self.track.open(resume)

    async def play(self, frame: ev.AgentAudioFrame, at_s: float) -> None:
        self.track.place_at(0, at_s, frame.pcm)

    async def persist(self, final: bool = False) -> None:
        await self.track.persist(final)


class LiveKitSink(Sink):
    """The agent in the session's LiveKit room: its voice, captions of both sides, its state."""

    def __init__(self, ctx: SessionContext[Any], cfg: LiveKitConfig, target: RoomTarget) -> None:
        self.ctx, self.cfg = ctx, cfg
        self.agent = AgentParticipant(cfg, ctx.session, target, ctx.spec.output_rate)

    async def open(self, resume: bool) -> None:
        """Join the room (a successor takes its predecessor's place); wait a little to be heard, not long.

        The first reply (a greeting) plays as soon as the session starts: it would be lost on a caller
        who does not receive the agent's track yet.
        """
        self.ctx.spawn(self._run(), "livekit")
        if not await self.agent.ready(self.cfg.join_timeout_s):
            logger.warning(
                "the agent is not heard in room %s yet; the session starts anyway", self.agent.target.room
            )

    async def _run(self) -> None:
        try:
            await self.agent.run()
        except RoomUnreachable as e:
            await self.ctx.report("provider", f"the agent cannot be in its LiveKit room: {e}", retryable=True)

    async def play(self, frame: ev.AgentAudioFrame, at_s: float) -> None:
        await self.agent.play(frame)

    async def flush(self) -> None:
        self.agent.flush()

    def on_event(self, event: ev.Event) -> None:
        self.agent.on_event(event)

    async def close(self) -> None:
        await self.agent.close()


def make_sink(ctx: SessionContext[Any], livekit: LiveKitConfig) -> Sink:
    """The sink the session's spec names."""
    spec = ctx.spec
    match spec.sink:
        case "bus":
            return BusSink(ctx)
        case "file" if spec.sink_uri:
            return FileSink(Path(spec.sink_uri), spec.output_rate)
        case "file":
            raise UnsupportedSink("the file sink needs the WAV path in sink_uri")
        case "livekit" if not livekit.configured:
            raise UnsupportedSink("LiveKit is not configured here (LIVEKIT_URL)")
        case "livekit":
            try:
                return LiveKitSink(ctx, livekit, RoomTarget.parse(spec.sink_uri))
            except BadRoomUri as e:
                raise UnsupportedSink(str(e)) from None
    raise UnsupportedSink(f"sink {spec.sink!r} is not served by this egress yet (bus, file and livekit are)")
