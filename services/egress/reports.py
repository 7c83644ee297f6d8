"""Egress's reports (playout, acks, timing marks), published in order off the pacing path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger("voicebus.egress")

#: How long closing a session waits for its reports to be published.
DRAIN_S = 5.0


class Reports:
    """Egress's reports, published one at a time in the order things happened.

    They go out off the pacing path: a slow JetStream acknowledgement never holds up a frame.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[Callable[[], Awaitable[object]], asyncio.Future[None]]] = (
            asyncio.Queue()
        )

    def send(self, publish: Callable[[], Awaitable[object]]) -> asyncio.Future[None]:
        """Queue a publication; the future is done once it went out (or failed and was logged)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((publish, done))
        return done

    async def run(self) -> None:
        """Publish what is queued, until cancelled."""
        while True:
            publish, done = await self._queue.get()
            try:
                await publish()
            except Exception:
                logger.exception("could not publish a playout report")
            finally:
                if not done.done():
                    done.set_result(None)
                self._queue.task_done()

    async def drain(self) -> None:
        """Wait until everything queued went out (bounded: the bus may be gone)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_S):
                await self._queue.join()
