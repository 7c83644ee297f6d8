"""The ingress stage: a session's caller audio in, 16 kHz 20 ms frames and the VAD's speech events out.

Per session, a ``CallerSource`` (bus or file, by ``spec.source``) delivers audio to a ``CallerStream``,
which frames it, runs the VAD and publishes the frames a few at a time. The worker checkpoints the
stream at every speech start and stop and about once a second, so a replica that takes the session
over continues the frame index, the VAD state and the file position instead of starting the caller's
stream again.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from proto import events as ev
from proto.state import IngressState, SourcePosition
from services.ingress.audio import Samples
from services.ingress.config import IngressConfig
from services.ingress.limits import CallLimits
from services.ingress.sources import SOURCES
from services.ingress.stream import CallerStream
from services.ingress.vad import SileroVad, VadModelError
from services.livekit.config import LiveKitConfig
from services.runtime import service
from services.runtime.bus import Delivery
from services.runtime.config import ConfigError, load
from services.runtime.service import SessionContext
from services.webrtc.config import WebRtcConfig
from services.webrtc.peer import use_host_addresses

logger = logging.getLogger("voicebus.ingress")


class IngressWorker(service.SessionWorker[IngressState]):
    """One session's caller side: its source, its stream, and the checkpoints a successor resumes from."""

    def __init__(self, ctx: SessionContext[IngressState], cfg: IngressConfig, model: SileroVad) -> None:
        super().__init__(ctx)
        self.cfg = cfg
        self.stream = CallerStream(ctx, model, cfg, ctx.restored)
        kind = SOURCES.get(ctx.spec.source)
        self.source = kind(ctx, cfg, self._deliver) if kind is not None else None
        self.media = self.source.media if self.source is not None else ()
        self._started = False
        self._checkpointed = time.monotonic()
        self.limits = CallLimits(ctx, max_duration_s=cfg.max_duration_s, inactivity_s=cfg.inactivity_s)

    async def start(self) -> None:
        """Refuse a source this ingress does not have; resume the source after a takeover."""
        self.limits.start()
        if self.source is None:
            await self.ctx.report(
                "malformed",
                f"caller source {self.ctx.spec.source!r} is not supported here (have: {', '.join(SOURCES)})",
            )
        elif self.ctx.restored is not None:
            await self._start_source(self.ctx.restored.source)

    async def on_event(self, event: ev.Event, delivery: Delivery) -> None:
        """The caller's audio starts flowing with the session; speech and playout keep the call alive."""
        match event:
            case ev.SpeechStarted() | ev.SpeechStopped() | ev.PlayoutStarted() | ev.PlayoutStopped():
                self.limits.activity()
            case ev.SessionEnded():
                self.limits.stop()
        match event:
            case ev.SessionStarted():
                await self._start_source(SourcePosition())
            case _ if self.source is not None:
                await self.source.on_event(event)

    async def on_media(self, event: ev.Event, delivery: Delivery) -> None:
        """Caller audio from the bus, for the source that follows it."""
        if self.source is not None:
            await self.source.on_media(event)

    async def close(self, handover: bool) -> None:
        """Stop the source; on handover, save where the stream is; else send the last frames held."""
        self.limits.stop()
        if self.source is not None:
            await self.source.close()
        if handover:
            await self._checkpoint()
            return
        try:
            await self.stream.flush()  # the end of the caller's track in the call recording
        except Exception:  # the call is over either way
            logger.warning("the caller's last frames could not be sent", exc_info=True)

    async def _start_source(self, position: SourcePosition) -> None:
        if self.source is None or self._started:
            return
        self._started = True
        await self.source.start(position)

    async def _deliver(self, samples: Samples, arrived_ns: int, last: bool, *, behind: bool = False) -> None:
        await self.stream.push(samples, arrived_ns, last=last, behind=behind)
        if self.stream.at_boundary or time.monotonic() - self._checkpointed >= self.cfg.checkpoint_s:
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        """Save the stream and the source position (a failed save is retried at the next interval)."""
        self._checkpointed = time.monotonic()
        try:
            state = await self.stream.save()
            if self.source is not None:
                state.source = self.source.position
            await self.ctx.checkpoint(state)
        except Exception:  # the bus is down: frames cannot go out either; the next save catches up
            logger.warning("checkpoint of the caller stream failed", exc_info=True)


def main() -> int:
    """Run one ingress replica; the VAD model is loaded before the replica says it is ready."""
    try:
        cfg = load(IngressConfig, webrtc=load(WebRtcConfig), livekit=load(LiveKitConfig))
        model = SileroVad.load(cfg.vad_model, cfg.vad_gather_ms / 1000)
    except (ConfigError, VadModelError) as e:
        print(f"ingress: {e}", file=sys.stderr)
        return 2

    if cfg.webrtc.host_addresses:
        use_host_addresses(cfg.webrtc.host_addresses)

    def worker(ctx: SessionContext[Any]) -> IngressWorker:
        return IngressWorker(ctx, cfg, model)

    return service.run("ingress", worker, state_type=IngressState)
