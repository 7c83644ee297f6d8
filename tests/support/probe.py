"""A minimal stage for testing the runtime on its own: counts frames and reports each as a transcript.

Run as ``python -m tests.support.probe <stage>``. It consumes the media channel named by
PROBE_MEDIA (default audio.in), checkpoints its count after every frame so a peer that takes the
session over continues the count, and opens a span under the trace context each frame carried.
"""

from __future__ import annotations

import os
import sys

import msgspec

from proto import events as ev
from proto import subjects as sj
from services.runtime import service, tracing
from services.runtime.bus import Delivery


class ProbeState(msgspec.Struct):
    frames: int = 0


class Probe(service.SessionWorker[ProbeState]):
    media = (sj.BY_NAME[os.environ.get("PROBE_MEDIA", "audio.in")],)

    async def start(self) -> None:
        self.frames = self.ctx.restored.frames if self.ctx.restored else 0

    async def on_media(self, event: ev.Event, delivery: Delivery) -> None:
        self.frames += 1
        # checkpoint first: once a count is visible, a successor continues after it
        await self.ctx.checkpoint(ProbeState(frames=self.frames))
        with tracing.span("probe.frame", parent=delivery.parent, frames=self.frames):
            await self.ctx.publish(
                sj.TRANSCRIPT,
                ev.Transcript(
                    session=self.ctx.session,
                    turn=0,
                    segment=self.frames,
                    text=str(self.frames),
                    is_final=True,
                ),
            )


if __name__ == "__main__":
    sys.exit(service.run(sys.argv[1], Probe, state_type=ProbeState))  # type: ignore[arg-type]
