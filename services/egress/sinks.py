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
from pathlib import Path
from typing import Any

from proto import events as ev
from proto import subjects as sj
from services.egress.config import EgressConfig
from services.egress.recording import WavTrack
from services.runtime.service import SessionContext


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


def make_sink(ctx: SessionContext[Any], cfg: EgressConfig) -> Sink:
    """The sink the session's spec names."""
    spec = ctx.spec
    match spec.sink:
        case "bus":
            return BusSink(ctx)
        case "webrtc":
            from services.egress.webrtc import WebRtcSink  # aiortc only where a session needs it

            return WebRtcSink(ctx, cfg.webrtc)
        case "file" if spec.sink_uri:
            return FileSink(Path(spec.sink_uri), spec.output_rate)
        case "file":
            raise UnsupportedSink("the file sink needs the WAV path in sink_uri")
        case "livekit":
            from services.egress.livekit import LiveKitSink  # the rtc SDK only where a session needs it

            return LiveKitSink(ctx, cfg.livekit)
    raise UnsupportedSink(
        f"sink {spec.sink!r} is not served by this egress (bus, file, webrtc and livekit are)"
    )
