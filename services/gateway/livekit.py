"""The gateway's LiveKit routes: tokens for apps' callers, the agent sent into rooms, LiveKit's webhooks.

- ``POST /livekit/token`` (an app's API key): ``{"room", "identity", "name"?, "ttl_s"?}`` -> 201 with a
  LiveKit access token for that room only, valid ``VB_LIVEKIT_TOKEN_TTL`` seconds unless the app asks
  for less (or more, up to ``VB_LIVEKIT_TOKEN_MAX_TTL``), and the server's URL.
- ``POST /livekit/sessions`` (an app's API key): ``{"room", "participant"?, "agent"?, "language"?}`` ->
  201: a session whose caller and agent are in the room (source and sink ``livekit``); the agent joins
  it and serves ``participant`` (or the first person in the room).
- ``POST /livekit/webhook`` (LiveKit's own signature: a JWT signed with the API secret carrying the
  body's SHA-256; anything else is 401): in a room configured for auto-dispatch
  (``VB_LIVEKIT_AUTO_DISPATCH``) ``room_started`` and ``participant_joined`` start the room's session;
  ``room_finished`` ends the sessions in the room, ``participant_left`` those serving that participant.

Sessions of a room are found by their id, ``lk-<room digest>-<instance>``: the webhook's instance is
the room's sid, so both start events of one room map to one session and the second finds it taken.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Annotated, TypeVar

import msgspec
from aiohttp import web
from livekit import api
from livekit.protocol import models
from msgspec import Meta
from nats.js.errors import KeyWrongLastSequenceError, NoKeysError, NotFoundError

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.livekit.config import LiveKitConfig
from services.livekit.room import RoomTarget
from services.livekit.tokens import caller_token
from services.runtime.bus import Bus
from services.runtime.sessions import SessionOpenError, end_session, open_session

logger = logging.getLogger("voicebus.gateway")

#: LiveKit carries Opus at 48 kHz: the agent speaks at that rate so nothing resamples it again.
OUTPUT_RATE: ev.AgentRate = 48_000
Name = Annotated[str, Meta(min_length=1, max_length=256)]
B = TypeVar("B", bound=msgspec.Struct)


class TokenRequest(msgspec.Struct, kw_only=True, frozen=True):
    """Who joins which room, for how long."""

    room: Name
    identity: Name
    name: str = ""
    ttl_s: Annotated[float, Meta(gt=0)] | None = None


class SessionRequest(msgspec.Struct, kw_only=True, frozen=True):
    """The room the agent joins, whom it serves there, and how it behaves."""

    room: Name
    participant: str = ""
    agent: ev.AgentSpec | None = None
    language: str = "en"


def room_prefix(room: str) -> str:
    """The start of the ids of every session in ``room``."""
    return f"lk-{hashlib.sha256(room.encode()).hexdigest()[:12]}-"


def session_id(room: str, instance: str = "") -> str:
    """A session id for ``room``: per room instance (its sid) when known, else unique."""
    return room_prefix(room) + (re.sub(r"[^A-Za-z0-9_-]", "", instance) or uuid.uuid4().hex[:16])


class LiveKitRoutes:
    """The handlers, with the bus, the settings and the app-key check they share."""

    def __init__(
        self,
        bus: Bus,
        cfg: LiveKitConfig,
        authorize: Callable[[web.Request], object],
        *,
        open_timeout_s: float = 10.0,
        greeting: str = "",
        stages: tuple[str, ...] = ev.STAGES,
    ) -> None:
        self.bus, self.cfg, self.authorize = bus, cfg, authorize
        self.open_timeout_s, self.greeting, self.stages = open_timeout_s, greeting, stages
        self.webhooks = api.WebhookReceiver(api.TokenVerifier(cfg.api_key, cfg.api_secret))

    def register(self, app: web.Application) -> None:
        """Add the routes to the gateway's application."""
        app.router.add_post("/livekit/token", self.token)
        app.router.add_post("/livekit/sessions", self.create)
        app.router.add_post("/livekit/webhook", self.webhook)

    def _configured(self) -> None:
        if not self.cfg.configured:
            raise web.HTTPServiceUnavailable(text="LiveKit is not configured here (LIVEKIT_URL)")

    # --- apps ---------------------------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        """A short-lived token for one participant of one room."""
        self.authorize(request)
        self._configured()
        wanted = await _body(request, TokenRequest)
        if self.cfg.ours(wanted.identity):
            raise web.HTTPBadRequest(
                text=f"identities starting with {self.cfg.identity_prefix}- are the agent's"
            )
        ttl_s = min(wanted.ttl_s or self.cfg.token_ttl_s, self.cfg.token_max_ttl_s)
        token = caller_token(self.cfg, wanted.room, wanted.identity, wanted.name, ttl_s)
        expires = datetime.datetime.fromtimestamp(time.time() + ttl_s, datetime.UTC)
        return web.json_response(
            {
                "url": self.cfg.url,
                "room": wanted.room,
                "identity": wanted.identity,
                "token": token,
                "expires_at": expires.isoformat(timespec="seconds"),
            },
            status=201,
        )

    async def create(self, request: web.Request) -> web.Response:
        """Send the agent into a room: a session with the room as its caller's source and its sink."""
        self.authorize(request)
        self._configured()
        wanted = await _body(request, SessionRequest)
        target = RoomTarget(wanted.room, wanted.participant)
        session = session_id(wanted.room)
        await self._open(session, target, wanted.agent, wanted.language)
        return web.json_response({"session": session, "room": wanted.room, "url": self.cfg.url}, status=201)

    async def _open(
        self, session: str, target: RoomTarget, agent: ev.AgentSpec | None, language: str
    ) -> None:
        spec = ev.SessionSpec(
            session=session,
            source="livekit",
            source_uri=target.uri(),
            sink="livekit",
            sink_uri=target.uri(),
            output_rate=OUTPUT_RATE,
            language=language,
            agent=agent or ev.AgentSpec(greeting=self.greeting),
        )
        try:
            await open_session(self.bus, spec, stages=self.stages, timeout_s=self.open_timeout_s)
        except SessionOpenError as e:
            logger.warning("could not send the agent into room %s: %s", target.room, e)
            await end_session(self.bus, session, "error")  # release the stages that did take it
            raise web.HTTPServiceUnavailable(text=f"the agent is not available: {e}") from None
        logger.info("session %s serves room %s", session, target.room)

    # --- LiveKit's webhooks -------------------------------------------------------------------------

    async def webhook(self, request: web.Request) -> web.Response:
        """Start or end the sessions of a room as LiveKit reports what happens in it."""
        self._configured()
        body = await request.text()
        auth = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        try:
            event = self.webhooks.receive(body, auth)
        except Exception:  # a bad signature, a stale token, a body that is not the one signed
            raise web.HTTPUnauthorized(text="invalid webhook signature") from None
        room, who = event.room.name, event.participant
        outcome = "ignored"
        match event.event:
            case "room_started" if self.cfg.auto_dispatched(room):
                outcome = await self._dispatch(event.room, "")
            case "participant_joined" if self.cfg.auto_dispatched(room) and self._caller(who):
                outcome = await self._dispatch(event.room, who.identity)
            case "room_finished":
                outcome = await self._end(room, lambda target: True)
            case "participant_left" if self._caller(who):
                outcome = await self._end(room, lambda target: target.participant == who.identity)
        logger.info("webhook %s for room %s: %s", event.event, room, outcome)
        return web.json_response({"event": event.event, "outcome": outcome})

    def _caller(self, participant: models.ParticipantInfo) -> bool:
        return participant.kind != models.ParticipantInfo.AGENT and not self.cfg.ours(participant.identity)

    async def _dispatch(self, room: models.Room, participant: str) -> str:
        """Open the session of this room instance unless an earlier event did."""
        session = session_id(room.name, room.sid)
        target = RoomTarget(room.name, participant)
        placeholder = ev.SessionSpec(session=session, source="livekit", source_uri=target.uri())
        try:
            await self.bus.kv[sj.SESSIONS_BUCKET].create(session, codec.encode(placeholder))
        except KeyWrongLastSequenceError:
            return "already served"
        await self._open(session, target, None, "en")
        return f"started {session}"

    async def _end(self, room: str, serving: Callable[[RoomTarget], bool]) -> str:
        ended = []
        for session, spec in await self._sessions(room):
            if serving(RoomTarget.parse(spec.source_uri)):
                await end_session(self.bus, session, "hangup")
                ended.append(session)
        return f"ended {', '.join(ended)}" if ended else "no session"

    async def _sessions(self, room: str) -> list[tuple[str, ev.SessionSpec]]:
        """The open sessions in ``room``."""
        store = self.bus.kv[sj.SESSIONS_BUCKET]
        try:
            keys = await store.keys()
        except NoKeysError:
            return []
        found = []
        for key in (k for k in keys if k.startswith(room_prefix(room))):
            try:
                entry = await store.get(key)
            except NotFoundError:  # ended meanwhile
                continue
            spec = codec.decode_record(ev.SessionSpec, entry.value or b"")
            if spec.source == "livekit" and RoomTarget.parse(spec.source_uri).room == room:
                found.append((key, spec))
        return found


async def _body(request: web.Request, kind: type[B]) -> B:
    try:
        return msgspec.json.decode(await request.read(), type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise web.HTTPBadRequest(text=f"invalid request: {e}") from None
