"""How long a call may last: a maximum duration, and an inactivity timeout, each ending the call cleanly.

The ingress owns the caller's side, so it ends the call: ``SessionEnded`` with reason ``max_duration``
(counted from the session's opening, so a replica that takes the session over keeps the same end) or
``inactivity`` (neither the caller spoke nor the agent played anything for that long). Both are in the
session's clock: a replay at twice real time reaches them in half the time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from services.runtime.service import SessionContext

logger = logging.getLogger("voicebus.ingress")


class CallLimits:
    """Timers on the event loop that end the session; ``activity`` re-arms the inactivity one."""

    def __init__(self, ctx: SessionContext[Any], *, max_duration_s: float, inactivity_s: float) -> None:
        self.ctx = ctx
        speed = ctx.spec.speed
        self._max_s, self._idle_s = max_duration_s / speed, inactivity_s / speed
        self._max: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._ended = False

    def start(self) -> None:
        """Arm both timers (a limit of 0 is off)."""
        if self._max_s:
            opened_s = (self.ctx.spec.opened_ts or time.time_ns()) / 1e9
            left = max(0.0, opened_s + self._max_s - time.time())
            self._max = asyncio.get_running_loop().call_later(left, self._end, "max_duration")
        self.activity()

    def activity(self) -> None:
        """The caller spoke or the agent played: the inactivity wait starts again."""
        if self._idle is not None:
            self._idle.cancel()
        if self._idle_s and not self._ended:
            self._idle = asyncio.get_running_loop().call_later(self._idle_s, self._end, "inactivity")

    def stop(self) -> None:
        """The session is over or handed over: no limit fires any more."""
        self._ended = True
        for timer in (self._max, self._idle):
            if timer is not None:
                timer.cancel()

    def _end(self, reason: str) -> None:
        if self._ended:
            return
        self.stop()
        logger.info("ending the call: %s", reason)
        self.ctx.spawn(self.ctx.end(reason), f"end:{reason}")
