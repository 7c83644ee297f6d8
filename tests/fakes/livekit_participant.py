"""A participant of the fake LiveKit server: the scripted caller, and a client connected over signalling.

``Client`` is the server's side of one SDK connection (tests/fakes/livekit_sfu.py hosts them): its
subscriber connection, which the server offers (data channels and the caller's microphone, each track
named by the msid stream id ``<participant sid>|<track sid>`` the SDK finds its publisher by, one
negotiation at a time), its publisher connection, which the client offers (decoded audio kept with
arrival times; ``TrackSubscribed`` once its media flows and a caller hears it), its data packets (text
streams by topic), attribute updates, and trickled candidates (kept until their description is set).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from aiohttp import web
from aiortc import RTCIceCandidate, RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import candidate_from_sdp
from livekit import api
from livekit.protocol import models, rtc

from tests.fakes.livekit_media import CallerTrack, Heard

if TYPE_CHECKING:
    from tests.fakes.livekit_sfu import Room

NEGOTIATION_TIMEOUT_S = 5.0


def new_sid(prefix: str) -> str:
    """A LiveKit-style id."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@dataclass
class Caller:
    """The scripted caller: a participant whose microphone the fake publishes.

    The microphone plays ``wav`` if given (then silence), else a tone at ``hz``: continuous, or in
    bursts of ``burst_ms`` every ``period_ms`` (each burst's start is known, for latency measurements).
    """

    identity: str = "caller"
    hz: float = 440.0
    wav: str = ""
    burst_ms: int = 0
    period_ms: int = 0
    sid: str = field(default_factory=lambda: new_sid("PA"))
    track_sid: str = field(default_factory=lambda: new_sid("TR"))
    #: Wall-clock time (s) of the microphone's first sample; set when the caller joins, and for a
    #: caller with words again when the first subscriber listens (``microphone_start``).
    t0: float = 0.0
    heard: bool = False

    def info(self, state: int = models.ParticipantInfo.ACTIVE) -> models.ParticipantInfo:
        track = models.TrackInfo(
            sid=self.track_sid,
            type=models.AUDIO,
            name="microphone",
            source=models.TrackSource.MICROPHONE,
            mime_type="audio/opus",
        )
        joined_ms = int(self.t0 * 1000)
        return models.ParticipantInfo(
            sid=self.sid,
            identity=self.identity,
            name=self.identity,
            state=state,
            tracks=[track],
            joined_at=joined_ms // 1000,
            joined_at_ms=joined_ms,
            is_publisher=True,
            permission=models.ParticipantPermission(can_subscribe=True, can_publish=True),
        )

    def track(self) -> CallerTrack:
        return CallerTrack(
            self.microphone_start, hz=self.hz, wav=self.wav, burst_ms=self.burst_ms, period_ms=self.period_ms
        )

    def microphone_start(self) -> float:
        """When sample 0 leaves the microphone: a tone runs from the join; a caller with words (``wav``)
        starts them when the first subscriber listens, as a person starts talking once the line is
        open (a subscriber slow to connect under load would otherwise miss them)."""
        if self.wav and not self.heard:
            self.t0, self.heard = time.time(), True
        return self.t0


@dataclass
class TextStream:
    """A data-channel text stream a participant sent."""

    sender: str
    topic: str
    attributes: dict[str, str]
    text: str = ""
    closed: bool = False
    final_attributes: dict[str, str] = field(default_factory=dict)


class Client:
    """One participant connected over signalling: the SDK under test."""

    def __init__(self, room: Room, ws: web.WebSocketResponse, claims: api.Claims) -> None:
        self.room, self.ws = room, ws
        self.sid = new_sid("PA")
        self.identity, self.name = claims.identity, claims.name or claims.identity
        video = claims.video or api.VideoGrants()
        self.hidden = bool(video.hidden)
        self.permission = models.ParticipantPermission(
            can_subscribe=video.can_subscribe,
            can_publish=video.can_publish,
            can_publish_data=video.can_publish_data,
            hidden=self.hidden,
            can_update_metadata=bool(video.can_update_own_metadata),
        )
        self.kind = (
            models.ParticipantInfo.AGENT if claims.kind == "agent" else models.ParticipantInfo.STANDARD
        )
        self.attributes: dict[str, str] = dict(claims.attributes or {})
        self.joined_ms = int(time.time() * 1000)
        self.state = models.ParticipantInfo.ACTIVE
        #: The server cut its signalling on purpose (``Room.drop``): it is kept for the client to resume.
        self.dropped = False
        self.tracks: list[models.TrackInfo] = []
        self.sub_pc = RTCPeerConnection()
        self.pub_pc: RTCPeerConnection | None = None
        self.streams: dict[str, TextStream] = {}
        #: The tracks this client is sent (the caller's microphone), by track sid, with their transceivers.
        self._sending: dict[str, tuple[MediaStreamTrack, RTCRtpTransceiver]] = {}
        self._answered = asyncio.Event()
        self._answered.set()
        #: Candidates trickled before the description they belong to was set, by signal target.
        self._early: dict[int, list[RTCIceCandidate]] = {rtc.PUBLISHER: [], rtc.SUBSCRIBER: []}
        self._tasks: set[asyncio.Task[None]] = set()
        self._negotiating = asyncio.Lock()

    def info(self) -> models.ParticipantInfo:
        return models.ParticipantInfo(
            sid=self.sid,
            identity=self.identity,
            name=self.name,
            state=self.state,
            tracks=self.tracks,
            joined_at=self.joined_ms // 1000,
            joined_at_ms=self.joined_ms,
            permission=self.permission,
            attributes=self.attributes,
            is_publisher=bool(self.tracks),
            kind=self.kind,
        )

    async def send(self, **message: Any) -> None:
        if not self.ws.closed:
            await self.ws.send_bytes(rtc.SignalResponse(**message).SerializeToString())

    # --- subscriber side: the server offers ---------------------------------------------------------

    async def offer_subscriptions(self) -> None:
        """(Re)negotiate the subscriber connection: the room caller's microphone in, a gone one out.

        One negotiation at a time: a new offer waits for the answer to the previous one.
        """
        async with self._negotiating:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered.wait(), NEGOTIATION_TIMEOUT_S)
            caller = self.room.caller
            for track_sid in [t for t in self._sending if caller is None or t != caller.track_sid]:
                track, transceiver = self._sending.pop(track_sid)  # its publisher left: stop sending it
                track.stop()
                transceiver.sender.replaceTrack(None)
                transceiver.direction = "inactive"
            if caller and self.permission.can_subscribe and caller.track_sid not in self._sending:
                track = caller.track()
                sender = self.sub_pc.addTrack(track)
                transceiver = next(t for t in self.sub_pc.getTransceivers() if t.sender is sender)
                self._sending[caller.track_sid] = (track, transceiver)
            if self.sub_pc.sctp is None:
                self.sub_pc.createDataChannel("_reliable", ordered=True)
                self.sub_pc.createDataChannel("_lossy", ordered=False, maxRetransmits=0)
            await self.sub_pc.setLocalDescription(await self.sub_pc.createOffer())
            streams = {}
            if caller is not None and caller.track_sid in self._sending:
                streams[self._sending[caller.track_sid][1].mid or ""] = f"{caller.sid}|{caller.track_sid}"
            self._answered.clear()
            await self.send(
                offer=rtc.SessionDescription(
                    type="offer", sdp=_with_streams(self.sub_pc.localDescription.sdp, streams)
                )
            )

    async def on_answer(self, answer: rtc.SessionDescription) -> None:
        await self.sub_pc.setRemoteDescription(RTCSessionDescription(answer.sdp, "answer"))
        await self._add_early(rtc.SUBSCRIBER, self.sub_pc)
        self._answered.set()

    # --- publisher side: the client offers ----------------------------------------------------------

    async def on_offer(self, offer: rtc.SessionDescription) -> None:
        if self.pub_pc is None:
            self.pub_pc = RTCPeerConnection()
            self.pub_pc.on("track", self._on_track)
            self.pub_pc.on("datachannel", self._on_datachannel)
        await self.pub_pc.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
        await self._add_early(rtc.PUBLISHER, self.pub_pc)
        await self.pub_pc.setLocalDescription(await self.pub_pc.createAnswer())
        await self.send(answer=rtc.SessionDescription(type="answer", sdp=self.pub_pc.localDescription.sdp))

    async def on_add_track(self, request: rtc.AddTrackRequest) -> None:
        track = models.TrackInfo(
            sid=new_sid("TR"),
            type=request.type,
            name=request.name,
            source=request.source,
            muted=request.muted,
            mime_type="audio/opus" if request.type == models.AUDIO else "",
        )
        self.tracks.append(track)
        self.room.published.append((self.identity, track.name, track.source))
        await self.send(track_published=rtc.TrackPublishedResponse(cid=request.cid, track=track))
        await self.room.broadcast(self)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            heard = self.room.heard.setdefault(self.identity, Heard())
            published = self.tracks[-1].sid if self.tracks else ""
            task = asyncio.create_task(_receive(track, heard, self.room.changed, self._subscribed(published)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _subscribed(self, track_sid: str) -> Callable[[], Awaitable[None]]:
        """Once the track's media flows, the room's caller hears it: the SDK is told it is subscribed."""

        async def tell() -> None:
            if self.room.caller is not None:
                await self.send(track_subscribed=rtc.TrackSubscribed(track_sid=track_sid))

        return tell

    def _on_datachannel(self, channel: Any) -> None:
        @channel.on("message")
        def on_message(message: bytes | str) -> None:
            if isinstance(message, bytes):
                self._on_data(models.DataPacket.FromString(message))

    def _on_data(self, packet: models.DataPacket) -> None:
        sender = packet.participant_identity or self.identity
        match packet.WhichOneof("value"):
            case "stream_header":
                header = packet.stream_header
                stream = TextStream(sender=sender, topic=header.topic, attributes=dict(header.attributes))
                self.streams[header.stream_id] = stream
                self.room.texts.append(stream)
            case "stream_chunk" if stream := self.streams.get(packet.stream_chunk.stream_id):
                stream.text += packet.stream_chunk.content.decode()
            case "stream_trailer" if stream := self.streams.get(packet.stream_trailer.stream_id):
                stream.closed = True
                stream.final_attributes = {**stream.attributes, **dict(packet.stream_trailer.attributes)}
        self.room.changed()

    # --- the rest of the signalling -----------------------------------------------------------------

    async def on_update_metadata(self, update: rtc.UpdateParticipantMetadata) -> None:
        for key, value in update.attributes.items():
            if value:
                self.attributes[key] = value
            else:
                self.attributes.pop(key, None)
        self.room.attribute_log.append((self.identity, dict(update.attributes), time.time_ns()))
        self.room.changed()
        await self.send(
            request_response=rtc.RequestResponse(request_id=update.request_id, reason=rtc.RequestResponse.OK)
        )
        await self.room.broadcast(self, include_self=True)

    async def on_trickle(self, trickle: rtc.TrickleRequest) -> None:
        init = json.loads(trickle.candidateInit)
        if not init.get("candidate"):
            return
        candidate = candidate_from_sdp(init["candidate"].removeprefix("candidate:"))
        candidate.sdpMid, candidate.sdpMLineIndex = init.get("sdpMid"), init.get("sdpMLineIndex")
        pc = self.pub_pc if trickle.target == rtc.PUBLISHER else self.sub_pc
        if pc is None or pc.remoteDescription is None:
            self._early[trickle.target].append(candidate)
        else:
            await pc.addIceCandidate(candidate)

    async def _add_early(self, target: int, pc: RTCPeerConnection) -> None:
        for candidate in self._early[target]:
            await pc.addIceCandidate(candidate)
        self._early[target].clear()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for track, _ in self._sending.values():
            track.stop()
        for pc in (self.sub_pc, self.pub_pc):
            if pc is not None:
                await pc.close()
                await _connect_task_ended(pc)


def _with_streams(sdp: str, streams: dict[str, str]) -> str:
    """Name the stream of each sending m-section (by mid) ``<participant sid>|<track sid>``."""
    sections = re.split(r"(?m)^(?=m=)", sdp)
    for i, section in enumerate(sections):
        mid = re.search(r"(?m)^a=mid:(\S+)", section)
        if mid and mid.group(1) in streams:
            sections[i] = re.sub(r"(?m)^a=msid:\S+ ", f"a=msid:{streams[mid.group(1)]} ", section)
    return "".join(sections)


async def _connect_task_ended(pc: RTCPeerConnection) -> None:
    """aiortc's connection task may still wait on an ICE check after ``close()``: end it too."""
    for task in asyncio.all_tasks():
        frame = getattr(task.get_coro(), "cr_frame", None)
        if frame is not None and frame.f_code.co_name == "__connect" and frame.f_locals.get("self") is pc:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _receive(
    track: MediaStreamTrack, heard: Heard, changed: Callable[[], None], flowing: Callable[[], Awaitable[None]]
) -> None:
    """Decode a published audio track into ``heard`` (48 kHz mono) with arrival times."""
    first = True
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()
            pcm: npt.NDArray[np.int16] = frame.to_ndarray().reshape(-1, len(frame.layout.channels))
            heard.add(time.time_ns(), pcm.mean(axis=1).astype(np.int16), frame.sample_rate)
            changed()
            if first:
                first = False
                await flowing()
