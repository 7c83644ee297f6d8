"""The caller's microphone in a LiveKit room: a hidden listener in the replica that owns the session.

``spec.source_uri`` names the room (``<room>`` or ``<room>?participant=<identity>``). The listener
(``services.livekit.listener``) hands over 20 ms frames at 16 kHz as they arrive; they go through the
stream like any source's. The source ends the session when the call is over in the room: the caller
left or the room ended (hangup), no caller came (inactivity), the listener was removed (operator), or
the room cannot be reached (error, reported).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from proto.state import SourcePosition
from services.ingress.audio import NO_SAMPLES, Samples
from services.ingress.config import IngressConfig
from services.ingress.sources import CallerSource, Deliver
from services.livekit.link import RoomUnreachable
from services.livekit.listener import CallerListener
from services.livekit.room import BadRoomUri, RoomTarget
from services.runtime.service import SessionContext

logger = logging.getLogger("voicebus.ingress")


class LiveKitSource(CallerSource):
    """The session's caller as the LiveKit SDK delivers them (``spec.source == "livekit"``)."""

    def __init__(self, ctx: SessionContext[Any], cfg: IngressConfig, deliver: Deliver) -> None:
        super().__init__(ctx, cfg, deliver)
        self.listener: CallerListener | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, position: SourcePosition) -> None:
        """Join the room (a live source: a successor starts from what the caller says now)."""
        livekit = self.cfg.livekit
        try:
            if not livekit.configured:
                raise BadRoomUri("LiveKit is not configured here (LIVEKIT_URL)")
            target = RoomTarget.parse(self.ctx.spec.source_uri)
        except BadRoomUri as e:
            await self.ctx.report("malformed", f"livekit source: {e}")
            await self.ctx.end("error")
            return
        self.listener = CallerListener(livekit, self.ctx.session, target, self._heard)
        self._task = self.ctx.spawn(self._listen(self.listener), "livekit")

    async def _heard(self, samples: Samples, arrived_ns: int) -> None:
        await self.deliver(samples, arrived_ns, False)

    async def _listen(self, listener: CallerListener) -> None:
        why: str
        try:
            why = await listener.run()
        except RoomUnreachable as e:
            await self.ctx.report("provider", f"livekit source: {e}", retryable=True)
            why = "error"
        if why == "closed":  # this replica let the session go, or a successor took the room
            return
        await self.deliver(NO_SAMPLES, time.time_ns(), True)  # the caller's last words fill a frame
        await self.ctx.end(why)

    async def close(self) -> None:
        """Leave the room."""
        if self.listener is not None:
            await self.listener.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])
