"""A fake LiveKit server: LiveKit's signalling protobufs over a WebSocket, aiortc for the media.

It proves the bridge's use of the SDK (tokens, participant events, subscribing and publishing, Opus over
SRTP, data-channel text streams, participant attributes) against the real ``livekit.rtc`` SDK pinned in
pyproject.toml. It does NOT prove interoperability with every LiveKit server version: the signalling
protocol drifts between releases, and this fake speaks only what that SDK needs, in the two peer
connection mode (``/rtc``; ``/rtc/v1`` answers 404 and the SDK falls back to ``/rtc``, as it does with
servers that predate the single peer connection).

What it does, following the real server where the SDK depends on it (livekit-protocol messages):

- ``/rtc`` checks the access token (signature with this server's secret, expiry with no leeway, a
  ``roomJoin`` grant for this server's room, an identity); a refused token gets 401 on the upgrade and
  on ``/rtc/validate``, where the SDK looks for the reason, so its connect fails.
- Join: a ``JoinResponse`` (subscriber primary), then the server's subscriber offer: data channels
  ``_reliable`` and ``_lossy`` and the tracks of the other participants, each with the msid stream id
  ``<participant sid>|<track sid>`` the SDK finds a track's publisher by. Trickled candidates (kept until
  their description is set), pings, leaves; hidden participants are not shown to others; a second
  participant with an identity already in the room replaces the first (``DUPLICATE_IDENTITY``).
- The room has a scripted caller (``Caller``): a participant whose microphone the fake publishes (a
  tone, bursts of one, or a WAV), who can join and leave (``participant_disconnected`` in the SDK).
- Publishing: ``AddTrackRequest`` -> ``TrackPublishedResponse``, the client's publisher offer answered,
  received audio decoded and kept with arrival times. Data packets on the publisher's channels are
  decoded (text streams by topic); attribute updates are answered and broadcast.
- ``end()`` deletes the room: every participant is told to leave (``ROOM_DELETED``).

Everything tests assert on is recorded in ``Room``. libwebrtc ignores loopback interfaces: run it on an
address of a non-loopback interface (tests/support/netns.py makes one).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from aiohttp import WSMsgType, web
from aiortc import RTCIceCandidate, RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import candidate_from_sdp
from livekit import api
from livekit.protocol import models, rtc

from tests.fakes.livekit_media import CallerTrack, Heard

logger = logging.getLogger("fake.livekit")

SERVER_VERSION = "1.8.4"
PROTOCOL = 15
PING_INTERVAL_S, PING_TIMEOUT_S = 5, 15
NEGOTIATION_TIMEOUT_S = 5.0


def new_sid(prefix: str) -> str:
    """A LiveKit-style id."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


class Refused(Exception):
    """A token this server does not accept; the message is what the client is told."""


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
    #: Wall-clock time (s) of the microphone's first sample; set when the caller joins.
    t0: float = 0.0

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
            self.t0, hz=self.hz, wav=self.wav, burst_ms=self.burst_ms, period_ms=self.period_ms
        )


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


class Room:
    """The one room this server hosts, its participants, and everything tests assert on."""

    def __init__(self, name: str, api_key: str, api_secret: str) -> None:
        self.name, self.sid = name, new_sid("RM")
        self.verifier = api.TokenVerifier(api_key, api_secret, leeway=datetime.timedelta(0))
        self.clients: dict[str, Client] = {}
        self.caller: Caller | None = None
        self.joins: list[tuple[str, bool, int]] = []  # (identity, hidden, at ns)
        self.refusals: list[str] = []
        self.published: list[tuple[str, str, int]] = []  # (identity, track name, source)
        self.heard: dict[str, Heard] = {}
        self.texts: list[TextStream] = []
        self.attribute_log: list[tuple[str, dict[str, str], int]] = []
        self.left: list[str] = []
        self.resumes: list[str] = []
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()

    async def wait(self, predicate: Callable[[], Any], timeout_s: float = 20.0) -> None:
        """Wait until ``predicate()`` holds; re-checked whenever something is recorded."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.1)

    def check(self, token: str) -> api.Claims:
        """The claims of a token that may join this room, or ``Refused``."""
        try:
            claims = self.verifier.verify(token)
        except Exception as e:  # PyJWT's errors: expired, bad signature, wrong issuer, malformed
            raise Refused(f"invalid token: {type(e).__name__}") from None
        video = claims.video
        if video is None or not video.room_join:
            raise Refused("permissions denied: no roomJoin grant")
        if video.room != self.name:
            raise Refused(f"permissions denied: the token is for room {video.room!r}")
        if not claims.identity:
            raise Refused("the token has no identity")
        return claims

    def others(self, of: Client) -> list[models.ParticipantInfo]:
        visible = [c.info() for c in self.clients.values() if not c.hidden and c is not of]
        return ([self.caller.info()] if self.caller else []) + visible

    async def broadcast(self, about: Client, *, include_self: bool = False) -> None:
        """Tell the others (and ``about`` itself, if asked) about a participant; hidden ones stay unseen."""
        update = rtc.ParticipantUpdate(participants=[about.info()])
        for client in list(self.clients.values()):
            if (client is about and include_self) or (client is not about and not about.hidden):
                await client.send(update=update)

    # --- the scripted caller and the room's end -----------------------------------------------------

    async def caller_joins(self, caller: Caller) -> None:
        caller.t0 = caller.t0 or time.time()
        self.caller = caller
        for client in list(self.clients.values()):
            await client.send(update=rtc.ParticipantUpdate(participants=[caller.info()]))
            await client.offer_subscriptions()

    async def caller_leaves(self) -> None:
        caller, self.caller = self.caller, None
        if caller is not None:
            update = rtc.ParticipantUpdate(participants=[caller.info(models.ParticipantInfo.DISCONNECTED)])
            for client in list(self.clients.values()):
                await client.send(update=update)
                await client.offer_subscriptions()

    async def drop(self, identity: str) -> None:
        """Cut a participant's signalling as a network failure would; it may resume (``reconnect=1``)."""
        for client in [c for c in self.clients.values() if c.identity == identity]:
            client.dropped = True
            await client.ws.close()

    async def restart(self, identity: str) -> None:
        """Tell a participant to reconnect from scratch (a server migration does): a full rejoin."""
        leave = rtc.LeaveRequest(reason=models.MIGRATION, action=rtc.LeaveRequest.RECONNECT)
        for client in [c for c in self.clients.values() if c.identity == identity]:
            await client.send(leave=leave)
            await client.ws.close()

    async def replace(self, identity: str) -> None:
        """One participant per identity: an earlier one with this identity is told to leave."""
        leave = rtc.LeaveRequest(reason=models.DUPLICATE_IDENTITY, action=rtc.LeaveRequest.DISCONNECT)
        for client in [c for c in self.clients.values() if c.identity == identity]:
            await client.send(leave=leave)
            await client.ws.close()

    async def end(self) -> None:
        """Delete the room: every participant is told to leave."""
        leave = rtc.LeaveRequest(reason=models.ROOM_DELETED, action=rtc.LeaveRequest.DISCONNECT)
        for client in list(self.clients.values()):
            await client.send(leave=leave)
            await client.ws.close()


class FakeLiveKit:
    """The HTTP side: ``/rtc`` (signalling), ``/rtc/validate``; ``/rtc/v1`` is not found."""

    def __init__(self, room: Room, host: str, port: int = 0) -> None:
        self.room, self.host, self.port = room, host, port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/rtc", self.signal)
        app.router.add_get("/rtc/validate", self.validate)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        for client in list(self.room.clients.values()):
            await client.ws.close()
            await client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeLiveKit:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    def _token(request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        return header[7:] if header.lower().startswith("bearer ") else request.query.get("access_token", "")

    async def validate(self, request: web.Request) -> web.Response:
        try:
            self.room.check(self._token(request))
        except Refused as e:
            return web.Response(status=401, text=str(e))
        return web.Response(text="success")

    async def signal(self, request: web.Request) -> web.StreamResponse:
        try:
            claims = self.room.check(self._token(request))
        except Refused as e:
            self.room.refusals.append(str(e))
            self.room.changed()
            return web.Response(status=401, text=str(e))
        resuming = self.room.clients.get(request.query.get("sid", ""))
        if request.query.get("reconnect") == "1" and (
            resuming is None or resuming.identity != claims.identity
        ):
            return web.Response(status=404, text="no such participant to resume")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if request.query.get("reconnect") == "1" and resuming is not None:
            client = resuming
            client.ws, client.dropped = ws, False
            self.room.resumes.append(client.identity)
            await client.send(reconnect=rtc.ReconnectResponse(server_info=self._server_info()))
            await client.send(update=rtc.ParticipantUpdate(participants=self.room.others(client)))
        else:
            await self.room.replace(claims.identity)
            client = Client(self.room, ws, claims)
            self.room.clients[client.sid] = client
            self.room.joins.append((client.identity, client.hidden, time.time_ns()))
            await client.send(join=self._join_response(client))
            await self.room.broadcast(client)
            await client.offer_subscriptions()
        self.room.changed()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY and not await self._on_request(
                    client, rtc.SignalRequest.FromString(msg.data)
                ):
                    break
        finally:
            if client.ws is ws and not client.dropped:  # not dropped on purpose, nor resumed on another
                await self._gone(client)
        return ws

    async def _gone(self, client: Client) -> None:
        self.room.clients.pop(client.sid, None)
        self.room.left.append(client.identity)
        client.state = models.ParticipantInfo.DISCONNECTED
        await self.room.broadcast(client)
        await client.close()
        self.room.changed()

    def _join_response(self, client: Client) -> rtc.JoinResponse:
        room = self.room
        return rtc.JoinResponse(
            room=models.Room(sid=room.sid, name=room.name, num_participants=len(room.others(client)) + 1),
            participant=client.info(),
            other_participants=room.others(client),
            server_version=SERVER_VERSION,
            subscriber_primary=True,
            ping_interval=PING_INTERVAL_S,
            ping_timeout=PING_TIMEOUT_S,
            server_info=self._server_info(),
        )

    @staticmethod
    def _server_info() -> models.ServerInfo:
        return models.ServerInfo(
            edition=models.ServerInfo.Standard, version=SERVER_VERSION, protocol=PROTOCOL
        )

    async def _on_request(self, client: Client, request: rtc.SignalRequest) -> bool:
        """Handle one request; False when the client leaves."""
        match request.WhichOneof("message"):
            case "offer":
                await client.on_offer(request.offer)
            case "answer":
                await client.on_answer(request.answer)
            case "trickle":
                await client.on_trickle(request.trickle)
            case "add_track":
                await client.on_add_track(request.add_track)
            case "update_metadata":
                await client.on_update_metadata(request.update_metadata)
            case "ping_req":
                now = int(time.time() * 1000)
                await client.send(
                    pong_resp=rtc.Pong(last_ping_timestamp=request.ping_req.timestamp, timestamp=now)
                )
            case "ping":
                await client.send(pong=int(time.time() * 1000))
            case "leave":
                return False
            case other:
                logger.debug("ignored %s from %s", other, client.identity)
        return True
