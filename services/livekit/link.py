"""A participant's presence in a room for the length of a call: join, log the SDK's reconnects, rejoin.

The SDK resumes a dropped connection by itself (signalling resume or a full restart); the link only
logs those. When a join fails, or the SDK gives up and reports the room disconnected, the link joins
again with a fresh token, for up to ``VB_LIVEKIT_REJOIN_S``. It stops for good when the room is gone
(deleted or closed), when the participant was removed, or when a successor replica joined with the same
identity: LiveKit keeps one participant per identity and the newcomer wins, which is what a takeover
needs, so the old replica must not fight its way back in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from livekit import rtc
from livekit.rtc import DisconnectReason
from livekit.rtc.participant import PublishTrackError
from prometheus_client import Counter, Histogram

from services.livekit.config import LiveKitConfig
from services.runtime.metrics import LATENCY_BUCKETS

logger = logging.getLogger("voicebus.livekit")

join_seconds = Histogram(
    "vb_livekit_join_seconds", "Time to join a room (signalling and ICE)", ["role"], buckets=LATENCY_BUCKETS
)
rejoins = Counter("vb_livekit_rejoins_total", "Joins after a failed join or a lost room connection", ["role"])
reconnects = Counter("vb_livekit_reconnects_total", "Connection losses the SDK resumed by itself", ["role"])

#: Why a room connection may end without the link trying again.
FINAL = frozenset(
    {
        DisconnectReason.CLIENT_INITIATED,
        DisconnectReason.ROOM_DELETED,
        DisconnectReason.ROOM_CLOSED,
        DisconnectReason.PARTICIPANT_REMOVED,
        DisconnectReason.DUPLICATE_IDENTITY,
    }
)
#: Of those, the ones that mean the call is over.
ROOM_ENDED = frozenset({DisconnectReason.ROOM_DELETED, DisconnectReason.ROOM_CLOSED})
BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0)
#: How long leaving a room may take (the SDK waits for its event stream to close).
LEAVE_TIMEOUT_S = 5.0


class RoomUnreachable(ConnectionError):
    """The room could not be (re)joined within ``VB_LIVEKIT_REJOIN_S``."""


def reason_name(reason: int) -> str:
    """A disconnect reason for logs."""
    return str(DisconnectReason.Name(reason)) if reason in DisconnectReason.values() else str(reason)  # type: ignore[arg-type]


class RoomLink:
    """Keeps one participant (``role``: listener or agent) in ``room`` until the room or the link ends.

    ``setup`` is called on each new ``rtc.Room`` before it connects (to register event handlers, which
    must be in place before the first events arrive); ``joined`` once it is connected.
    """

    def __init__(
        self,
        cfg: LiveKitConfig,
        *,
        role: str,
        room: str,
        token: Callable[[], str],
        auto_subscribe: bool,
        setup: Callable[[rtc.Room], None],
        joined: Callable[[rtc.Room], Awaitable[None]],
    ) -> None:
        self.cfg, self.role, self.room_name = cfg, role, room
        self._token, self._setup, self._joined = token, setup, joined
        self._options = rtc.RoomOptions(auto_subscribe=auto_subscribe, connect_timeout=cfg.join_timeout_s)
        self.room: rtc.Room | None = None
        self.connected = asyncio.Event()
        self._closing = asyncio.Event()
        self._gone: asyncio.Future[int] | None = None
        #: Seconds the first successful join took, for the session's logs and the tests.
        self.first_join_s: float | None = None

    async def run(self) -> int:
        """Stay in the room; return the reason it was left for good, or raise ``RoomUnreachable``."""
        deadline: float | None = None
        attempt = 0
        while not self._closing.is_set():
            room = rtc.Room()
            gone: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._gone = gone
            self._watch(room, gone)
            self._setup(room)
            started = time.monotonic()
            try:
                await room.connect(self.cfg.url, self._token(), self._options)
                await self._joined(room)
            except (rtc.ConnectError, PublishTrackError) as e:
                deadline = deadline or started + self.cfg.rejoin_s
                await self._leave(room)
                if time.monotonic() >= deadline:
                    raise RoomUnreachable(f"could not join room {self.room_name}: {_message(e)}") from None
                logger.warning(
                    "joining room %s as %s failed: %s; trying again", self.room_name, self.role, _message(e)
                )
                with contextlib.suppress(TimeoutError):  # close() ends the wait
                    await asyncio.wait_for(self._closing.wait(), BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
                attempt += 1
                rejoins.labels(self.role).inc()
                continue
            except BaseException:
                await asyncio.shield(self._leave(room))
                raise
            took = time.monotonic() - started
            join_seconds.labels(self.role).observe(took)
            self.first_join_s = took if self.first_join_s is None else self.first_join_s
            logger.info("joined room %s as %s in %.0f ms", self.room_name, self.role, took * 1000)
            self.room, deadline, attempt = room, None, 0
            self.connected.set()
            try:
                if self._closing.is_set():  # closed while joining
                    await self._leave(room)
                    self._left()
                reason = await gone
            finally:
                self.connected.clear()
                await asyncio.shield(self._leave(room))
            if reason in FINAL or self._closing.is_set():
                logger.info("left room %s as %s: %s", self.room_name, self.role, reason_name(reason))
                return reason
            logger.warning(
                "lost room %s as %s (%s); joining again", self.room_name, self.role, reason_name(reason)
            )
            deadline = time.monotonic() + self.cfg.rejoin_s
            rejoins.labels(self.role).inc()
        return DisconnectReason.CLIENT_INITIATED

    async def close(self) -> None:
        """Leave the room and stop (``run`` returns CLIENT_INITIATED)."""
        self._closing.set()
        if self.room is not None:
            await self._leave(self.room)
            self._left()

    def _left(self) -> None:
        """We left: ``run`` stops waiting for the room's end even if the SDK said nothing of it."""
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(DisconnectReason.CLIENT_INITIATED)

    def _watch(self, room: rtc.Room, gone: asyncio.Future[int]) -> None:
        def disconnected(reason: int) -> None:
            if not gone.done():
                gone.set_result(reason)

        def reconnecting() -> None:
            reconnects.labels(self.role).inc()
            logger.warning("connection to room %s lost; the SDK is reconnecting", self.room_name)

        def reconnected() -> None:
            logger.info("connection to room %s resumed", self.room_name)

        room.on("disconnected", disconnected)
        room.on("reconnecting", reconnecting)
        room.on("reconnected", reconnected)

    async def _leave(self, room: rtc.Room) -> None:
        if room.isconnected():
            try:
                await asyncio.wait_for(room.disconnect(), LEAVE_TIMEOUT_S)
            except TimeoutError:
                logger.warning(
                    "leaving room %s as %s did not finish; going anyway", self.room_name, self.role
                )


def _message(e: Exception) -> str:
    """The SDK's error text (ConnectError keeps it in ``message``); never includes the token."""
    return str(getattr(e, "message", "") or e)
