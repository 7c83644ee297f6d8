"""Hearing the caller: a hidden participant that subscribes to the caller's microphone, as 16 kHz frames.

The listener joins the session's room unseen (its token is hidden and subscribe-only), takes the
caller's microphone track when it is subscribed (the named participant's, or the first person's), and
reads it through ``rtc.AudioStream`` at 16 kHz mono in 20 ms frames: the SDK decodes, downmixes and
resamples, so each frame reaches the ingress as it arrives. The call ends when the caller
leaves, when the room ends, or when no caller shows up within ``VB_LIVEKIT_CALLER_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import numpy as np
import numpy.typing as npt
from livekit import rtc
from livekit.rtc import DisconnectReason

from proto.events import FRAME_MS, USER_RATE
from services.livekit.config import LiveKitConfig
from services.livekit.link import ROOM_ENDED, RoomLink
from services.livekit.room import RoomTarget, is_voice
from services.livekit.tokens import listener_token

logger = logging.getLogger("voicebus.livekit")

Samples = npt.NDArray[np.int16]
#: Hands the caller's audio on: (16 kHz mono samples, wall-clock arrival in ns).
OnAudio = Callable[[Samples, int], Awaitable[None]]
#: Why the call ended, as the session's end reason; "closed" when the listener was told to leave or a
#: successor replica took its place (the call goes on).
Ending = Literal["hangup", "inactivity", "operator", "closed"]
#: Frames the SDK may hold for a slow consumer before it drops the oldest (one second of audio).
STREAM_CAPACITY = 1000 // FRAME_MS
#: How long the caller must stay gone before the call ends. When the SDK restarts its connection it
#: announces every participant gone, and back once it has rejoined: that is not a hang-up.
LEFT_GRACE_S = 2.0


def caller_stream(track: rtc.Track) -> rtc.AudioStream:
    """The caller's track as 20 ms frames of 16 kHz mono (decoded, downmixed, resampled by the SDK)."""
    return rtc.AudioStream.from_track(
        track=track, sample_rate=USER_RATE, num_channels=1, frame_size_ms=FRAME_MS, capacity=STREAM_CAPACITY
    )


def frame_samples(frame: rtc.AudioFrame) -> Samples:
    """A mono s16 frame's samples (no copy: the array keeps the frame's buffer alive)."""
    return np.frombuffer(frame.data, np.int16)


class CallerListener:
    """One session's ear in its LiveKit room."""

    def __init__(self, cfg: LiveKitConfig, session: str, target: RoomTarget, on_audio: OnAudio) -> None:
        self.cfg, self.target, self.on_audio = cfg, target, on_audio
        self.link = RoomLink(
            cfg,
            role="listener",
            room=target.room,
            token=lambda: listener_token(cfg, target.room, session),
            auto_subscribe=True,
            setup=self._setup,
            joined=self._joined,
        )
        #: The identity being heard, once its microphone is subscribed.
        self.caller = ""
        self.heard = asyncio.Event()
        self._ended = asyncio.Event()
        self._why: Ending = "hangup"
        self._reader: asyncio.Task[None] | None = None
        self._track: rtc.Track | None = None
        self._no_caller: asyncio.TimerHandle | None = None
        self._left: asyncio.TimerHandle | None = None

    async def run(self) -> Ending:
        """Listen until the call ends; raises ``RoomUnreachable`` if the room cannot be joined."""
        link = asyncio.create_task(self.link.run(), name="livekit-listener-link")
        ended = asyncio.create_task(self._ended.wait(), name="livekit-listener-end")
        try:
            await asyncio.wait((link, ended), return_when=asyncio.FIRST_COMPLETED)
            if self._ended.is_set():
                return self._why
            reason = link.result()
            if reason in ROOM_ENDED:
                return "hangup"
            return "operator" if reason == DisconnectReason.PARTICIPANT_REMOVED else "closed"
        finally:
            for timer in (self._no_caller, self._left):
                if timer is not None:
                    timer.cancel()
            ended.cancel()
            link.cancel()  # it leaves the room on its way out
            await asyncio.gather(link, ended, return_exceptions=True)
            await self._stop_reading()

    def _end(self, why: Ending) -> None:
        if not self._ended.is_set():
            self._why = why
            self._ended.set()

    # --- room events (called by the SDK's event emitter, on the event loop) --------------------------

    def _setup(self, room: rtc.Room) -> None:
        room.on("track_subscribed", self._on_track)
        room.on("participant_disconnected", self._on_left)

    async def _joined(self, room: rtc.Room) -> None:
        """Start the wait for the caller; take tracks subscribed while connecting, if they were missed."""
        if not self.heard.is_set() and self._no_caller is None:
            self._no_caller = asyncio.get_running_loop().call_later(
                self.cfg.caller_timeout_s, self._timed_out
            )
        for participant in room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.track is not None:
                    self._on_track(publication.track, publication, participant)

    def _on_track(
        self, track: rtc.Track, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant
    ) -> None:
        if not is_voice(publication) or not self.target.is_caller(self.cfg, participant):
            return
        if self.caller and participant.identity != self.caller:
            logger.info("ignoring %s's microphone: this session hears %s", participant.identity, self.caller)
            return
        if track is self._track and self._reader is not None and not self._reader.done():
            return  # announced and found again by ``_joined``
        self.caller, self._track = participant.identity, track
        self.heard.set()
        logger.info("hearing %s (track %s) in room %s", self.caller, publication.sid, self.target.room)
        # a new subscription of the caller's microphone (after the SDK restarted its connection)
        # replaces the previous one, whose stream may never end by itself
        previous, self._reader = self._reader, None
        if previous is not None:
            previous.cancel()
        self._reader = asyncio.create_task(self._read(track, previous), name="livekit-caller-audio")

    def _on_left(self, participant: rtc.RemoteParticipant) -> None:
        if participant.identity == self.caller and self._left is None:
            self._left = asyncio.get_running_loop().call_later(LEFT_GRACE_S, self._check_left)

    def _check_left(self) -> None:
        """The caller left: end the call, unless the connection is being restored or they are back."""
        self._left = None
        room = self.link.room
        if not self.link.connected.is_set() or (
            room is not None and room.connection_state == rtc.ConnectionState.CONN_RECONNECTING
        ):
            self._left = asyncio.get_running_loop().call_later(LEFT_GRACE_S, self._check_left)
        elif room is None or all(p.identity != self.caller for p in room.remote_participants.values()):
            logger.info("caller %s left room %s", self.caller, self.target.room)
            self._end("hangup")

    def _timed_out(self) -> None:
        if not self.heard.is_set():
            logger.info("no caller in room %s after %.0f s", self.target.room, self.cfg.caller_timeout_s)
            self._end("inactivity")

    async def _read(self, track: rtc.Track, previous: asyncio.Task[None] | None) -> None:
        """Hand on every frame; a frame that cannot be handed on (a bus outage) does not stop the rest."""
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        stream = caller_stream(track)
        failing = False
        try:
            async for event in stream:
                try:
                    await self.on_audio(frame_samples(event.frame), time.time_ns())
                    failing = False
                except Exception:
                    if not failing:
                        logger.exception("the caller's audio could not be handed on")
                    failing = True
        finally:
            await stream.aclose()
        logger.info("the caller's track ended")

    async def _stop_reading(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def close(self) -> None:
        """Leave the room (``run`` returns "closed")."""
        await self.link.close()
