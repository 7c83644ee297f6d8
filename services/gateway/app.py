"""The gateway's HTTP API: sessions, WHIP/WHEP, live events, and the page.

- ``POST /sessions`` opens a session whose caller and agent audio go over WebRTC (201: its id, the
  WHIP/WHEP URLs, the events URL, the browser's session token).
- ``POST /whip/<session>`` / ``POST /whep/<session>``: an SDP offer (``application/sdp``, ICE gathered)
  relayed to the session's ingress / egress owner; 201 with its answer and ``Location``.
- ``DELETE /sessions/<session>`` (the ``Location``) ends the session.
- ``GET /sessions/<session>/events``: server-sent events of the conversation.

The gateway keeps no state: the session registry and the owners are on the bus, so any replica can
serve any request.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from aiohttp import web
from nats.js.errors import NotFoundError

from proto import codec
from proto import events as ev
from proto import subjects as sj
from proto.system import MAX_SDP
from services.gateway import events
from services.gateway.auth import Keys, session_token
from services.gateway.config import GatewayConfig
from services.gateway.livekit import LiveKitRoutes
from services.gateway.relay import NoOwner, OfferRefused, relay_offer
from services.runtime.bus import Bus
from services.runtime.sessions import SessionOpenError, end_session, open_session

logger = logging.getLogger("voicebus.gateway")

STATIC = Path(__file__).with_name("static")
#: Sessions the gateway opens send 48 kHz to the browser: Opus's own rate, so nothing resamples it again.
OUTPUT_RATE: ev.AgentRate = 48_000
#: Largest request body: an SDP offer, or a session's agent settings.
MAX_BODY = MAX_SDP
SDP_TYPE = "application/sdp"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SessionRequest(msgspec.Struct, kw_only=True, frozen=True):
    """Optional body of ``POST /sessions``: how the agent behaves in this session."""

    agent: ev.AgentSpec | None = None
    language: str = "en"


class Gateway:
    """The handlers, with the bus and the settings they share."""

    def __init__(self, bus: Bus, cfg: GatewayConfig) -> None:
        self.bus, self.cfg = bus, cfg
        self.keys = Keys(cfg.api_keys)
        self.closing = asyncio.Event()

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._cors])
        app.router.add_get("/", self.page)
        app.router.add_static("/static/", STATIC)
        app.router.add_post("/sessions", self.create)
        app.router.add_delete("/sessions/{session}", self.delete)
        app.router.add_get("/sessions/{session}/events", self.events)
        app.router.add_post("/whip/{session}", self.whip)
        app.router.add_post("/whep/{session}", self.whep)
        LiveKitRoutes(
            self.bus,
            self.cfg.livekit,
            self.keys.app_key,
            open_timeout_s=self.cfg.open_timeout_s,
            greeting=self.cfg.greeting,
        ).register(app)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, _: web.Application) -> None:
        self.closing.set()  # ends the event streams, so the server can stop

    @web.middleware
    async def _cors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Let the configured origins' pages call the API (preflight answered here), errors included."""
        origin = request.headers.get("Origin", "")
        if not origin or not ("*" in self.cfg.cors_origins or origin in self.cfg.cors_origins):
            return await handler(request)
        allow = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": "Location",
            "Vary": "Origin",
        }
        if request.method == "OPTIONS":
            return web.Response(
                status=204,
                headers={
                    **allow,
                    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                    "Access-Control-Allow-Headers": "Authorization, Content-Type",
                    "Access-Control-Max-Age": "600",
                },
            )
        try:
            response = await handler(request)
        except web.HTTPException as e:
            e.headers.update(allow)
            raise
        response.headers.update(allow)
        return response

    # --- the page ---------------------------------------------------------------------------------

    async def page(self, _: web.Request) -> web.FileResponse:
        """The page a caller talks to the agent from."""
        return web.FileResponse(STATIC / "index.html")

    # --- sessions ---------------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        """Open a WebRTC session served by every stage; 201 with where to send and get its media."""
        key = self.keys.app_key(request)
        body = await request.read()
        try:
            wanted = msgspec.json.decode(body, type=SessionRequest) if body.strip() else SessionRequest()
        except msgspec.DecodeError as e:
            raise web.HTTPBadRequest(text=f"invalid session request: {e}") from None
        session = uuid.uuid4().hex
        spec = ev.SessionSpec(
            session=session,
            source="webrtc",
            sink="webrtc",
            output_rate=OUTPUT_RATE,
            language=wanted.language,
            agent=wanted.agent or ev.AgentSpec(greeting=self.cfg.greeting),
        )
        try:
            await open_session(self.bus, spec, timeout_s=self.cfg.open_timeout_s)
        except SessionOpenError as e:
            logger.warning("could not open a session: %s", e)
            await end_session(self.bus, session, "error")  # release the stages that did take it
            raise web.HTTPServiceUnavailable(text=f"the agent is not available: {e}") from None
        logger.info("opened session %s", session)
        resource = f"/sessions/{session}"
        return web.json_response(
            {
                "session": session,
                "whip": f"/whip/{session}",
                "whep": f"/whep/{session}",
                "events": f"{resource}/events",
                "token": session_token(key, session) if key else "",
            },
            status=201,
            headers={"Location": resource},
        )

    async def delete(self, request: web.Request) -> web.Response:
        """End the session (the WHIP/WHEP resource)."""
        session = await self._known(request)
        await end_session(self.bus, session, "hangup")
        logger.info("session %s ended by its client", session)
        return web.Response(status=200)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The session's conversation as server-sent events."""
        session = await self._known(request)
        return await events.stream(request, self.bus, session, self.closing)

    async def whip(self, request: web.Request) -> web.Response:
        """The caller's microphone: the offer goes to the session's ingress owner."""
        return await self._relay(request, "ingress")

    async def whep(self, request: web.Request) -> web.Response:
        """The agent's voice: the offer goes to the session's egress owner."""
        return await self._relay(request, "egress")

    async def _relay(self, request: web.Request, stage: str) -> web.Response:
        spec = await self._spec(request)
        if request.content_type != SDP_TYPE:
            raise web.HTTPUnsupportedMediaType(text=f"send the offer as {SDP_TYPE}")
        sdp = await request.text()
        if not sdp.startswith("v=0") or "\nm=audio " not in sdp:
            raise web.HTTPBadRequest(text="the body is not an SDP offer with an audio section")
        if (spec.source if stage == "ingress" else spec.sink) != "webrtc":
            raise web.HTTPConflict(text=f"session {spec.session} does not use WebRTC for its {stage} side")
        try:
            answer = await relay_offer(self.bus, stage, spec.session, sdp, self.cfg.signal_timeout_s)
        except NoOwner as e:
            raise web.HTTPServiceUnavailable(text=str(e), headers={"Retry-After": "1"}) from None
        except OfferRefused as e:
            if e.code == "bad_sdp":
                raise web.HTTPBadRequest(text=f"offer refused: {e}") from None
            if e.code == "not_served":
                raise web.HTTPNotFound(text=f"the {stage} does not serve this session: {e}") from None
            raise web.HTTPBadGateway(text=f"the {stage} could not answer: {e}") from None
        except codec.ContractError as e:
            raise web.HTTPBadGateway(text=f"the {stage} answered something unreadable: {e}") from None
        return web.Response(
            status=201,
            body=answer.sdp.encode(),
            content_type=SDP_TYPE,
            headers={"Location": f"/sessions/{spec.session}"},
        )

    async def _known(self, request: web.Request) -> str:
        """The session the path names, if it is open and the request may use it (else 401/404)."""
        return (await self._spec(request)).session

    async def _spec(self, request: web.Request) -> ev.SessionSpec:
        session = request.match_info["session"]
        try:
            msgspec.convert(session, ev.SessionId)
        except msgspec.ValidationError:
            raise web.HTTPNotFound(text="no such session") from None
        self.keys.check_session(request, session)
        try:
            entry = await self.bus.kv[sj.SESSIONS_BUCKET].get(session)
        except NotFoundError:
            raise web.HTTPNotFound(text=f"no session {session}") from None
        if not entry.value:
            raise web.HTTPNotFound(text=f"no session {session}")
        return codec.decode_record(ev.SessionSpec, entry.value)
