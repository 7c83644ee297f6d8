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

Everything tests assert on is recorded in ``Room``; each connected SDK is a ``Client``
(tests/fakes/livekit_participant.py). libwebrtc ignores loopback interfaces: run the server on an
address of a non-loopback interface (tests/support/netns.py makes one).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web
from livekit import api
from livekit.protocol import models, rtc

from tests.fakes.livekit_media import Heard
from tests.fakes.livekit_participant import Caller, Client, TextStream, new_sid

logger = logging.getLogger("fake.livekit")

SERVER_VERSION = "1.8.4"
PROTOCOL = 15
PING_INTERVAL_S, PING_TIMEOUT_S = 5, 15


class Refused(Exception):
    """A token this server does not accept; the message is what the client is told."""


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
