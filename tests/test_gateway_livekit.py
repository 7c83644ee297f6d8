"""The gateway's LiveKit routes over HTTP, on the real bus: tokens, sessions in rooms, signed webhooks.

Sessions are opened with no stage required to take them (``stages=()``), so what is checked is what
the gateway does: the session registered and announced with the room as its source and sink, and ended.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from google.protobuf.json_format import MessageToJson
from livekit import api
from livekit.protocol import models, webhook

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.gateway.livekit import LiveKitRoutes, room_prefix, session_id
from services.livekit.config import LiveKitConfig
from services.runtime.bus import Bus
from tests.support.tap import Tap

KEY, SECRET, APP_KEY = "APIkey1", "a-secret-of-at-least-32-characters!!", "app-key-123456"
CFG = LiveKitConfig(
    url="wss://livekit.example", api_key=KEY, api_secret=SECRET, auto_dispatch=("support-*",), token_ttl_s=120
)


def app_key(request: web.Request) -> str:
    if request.headers.get("Authorization") != f"Bearer {APP_KEY}":
        raise web.HTTPUnauthorized(text="an API key is required")
    return APP_KEY


@pytest.fixture
async def gateway(bus: Bus) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    app = web.Application()
    LiveKitRoutes(bus, CFG, app_key, stages=()).register(app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as http:
        yield http, str(server.make_url("/"))
    await server.close()


def signed(event: webhook.WebhookEvent, secret: str = SECRET) -> tuple[str, dict[str, str]]:
    """A webhook body and headers as LiveKit sends them: a JWT carrying the body's SHA-256."""
    body = MessageToJson(event)
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    token = api.AccessToken(KEY, secret).with_sha256(digest).with_ttl(datetime.timedelta(minutes=5)).to_jwt()
    return body, {"Authorization": token, "Content-Type": "application/webhook+json"}


def event(kind: str, room: str, sid: str, identity: str = "", agent: bool = False) -> webhook.WebhookEvent:
    who = models.ParticipantInfo(
        identity=identity, kind=models.ParticipantInfo.AGENT if agent else models.ParticipantInfo.STANDARD
    )
    return webhook.WebhookEvent(
        event=kind, room=models.Room(name=room, sid=sid), participant=who if identity else None, id="EV_1"
    )


async def post_webhook(http: aiohttp.ClientSession, base: str, body: str, headers: dict[str, str]) -> Any:
    async with http.post(f"{base}livekit/webhook", data=body, headers=headers) as r:
        return r.status, (await r.json() if r.status == 200 else await r.text())


async def test_webhooks_are_refused_without_a_valid_signature(
    gateway: tuple[aiohttp.ClientSession, str], bus: Bus
) -> None:
    http, base = gateway
    body, headers = signed(event("room_started", "support-7", "RM_badsig1"))
    session = session_id("support-7", "RM_badsig1")
    async with Tap(bus, session) as tap:
        assert (await post_webhook(http, base, body, {}))[0] == 401
        assert (await post_webhook(http, base, body, {"Authorization": "Bearer nonsense"}))[0] == 401
        forged, forged_headers = signed(event("room_started", "support-7", "RM_badsig1"), secret="x" * 36)
        assert (await post_webhook(http, base, forged, forged_headers))[0] == 401
        tampered = body.replace("support-7", "support-8")
        assert (await post_webhook(http, base, tampered, headers))[0] == 401
    assert not tap.events  # nothing was started


async def test_a_signed_webhook_starts_and_ends_the_rooms_session(
    gateway: tuple[aiohttp.ClientSession, str], bus: Bus
) -> None:
    http, base = gateway
    room, sid = "support-42", "RM_abc123def456"
    session = session_id(room, sid)
    async with Tap(bus, session) as tap:
        status, reply = await post_webhook(
            http, base, *signed(event("participant_joined", room, sid, "alice"))
        )
        assert (status, reply["outcome"]) == (200, f"started {session}")
        (started,) = await tap.wait(ev.SessionStarted)
        spec = started.spec
        assert (spec.source, spec.sink, spec.source_uri) == (
            "livekit",
            "livekit",
            f"{room}?participant=alice",
        )

        # the room's other start event, and the agent's own arrival, start nothing more
        _, reply = await post_webhook(http, base, *signed(event("room_started", room, sid)))
        assert reply["outcome"] == "already served"
        _, reply = await post_webhook(
            http, base, *signed(event("participant_joined", room, sid, "x", agent=True))
        )
        assert reply["outcome"] == "ignored"
        # someone else leaving does not end alice's call; alice leaving does
        _, reply = await post_webhook(http, base, *signed(event("participant_left", room, sid, "bob")))
        assert reply["outcome"] == "no session"
        _, reply = await post_webhook(http, base, *signed(event("participant_left", room, sid, "alice")))
        assert reply["outcome"] == f"ended {session}"
        (ended,) = await tap.wait(ev.SessionEnded)
        assert ended.reason == "hangup"
    assert len(tap.of(ev.SessionStarted)) == 1


async def test_room_finished_ends_every_session_in_the_room(
    gateway: tuple[aiohttp.ClientSession, str], bus: Bus
) -> None:
    http, base = gateway
    room, sid = "support-43", "RM_fin000000001"
    session = session_id(room, sid)
    async with Tap(bus, session) as tap:
        _, reply = await post_webhook(http, base, *signed(event("room_started", room, sid)))
        assert reply["outcome"] == f"started {session}"
        await tap.wait(ev.SessionStarted)
        _, reply = await post_webhook(http, base, *signed(event("room_finished", room, sid)))
        assert reply["outcome"] == f"ended {session}"
        await tap.wait(ev.SessionEnded)


async def test_rooms_not_configured_for_auto_dispatch_are_left_alone(
    gateway: tuple[aiohttp.ClientSession, str], bus: Bus
) -> None:
    http, base = gateway
    session = session_id("private-1", "RM_private0001")
    async with Tap(bus, session) as tap:
        _, reply = await post_webhook(
            http, base, *signed(event("participant_joined", "private-1", "RM_private0001", "al"))
        )
        assert reply["outcome"] == "ignored"
    assert not tap.events


async def test_token_endpoint_issues_short_lived_room_scoped_tokens(
    gateway: tuple[aiohttp.ClientSession, str],
) -> None:
    http, base = gateway
    auth = {"Authorization": f"Bearer {APP_KEY}"}
    async with http.post(f"{base}livekit/token", json={"room": "r9", "identity": "bob"}) as r:
        assert r.status == 401
    async with http.post(f"{base}livekit/token", json={"room": "r9", "identity": "bob"}, headers=auth) as r:
        assert r.status == 201
        issued = await r.json()
    assert (issued["url"], issued["room"], issued["identity"]) == (CFG.url, "r9", "bob")
    claims = api.TokenVerifier(KEY, SECRET).verify(issued["token"])
    assert claims.identity == "bob" and claims.video is not None and claims.video.room == "r9"
    raw = json.loads(base64.urlsafe_b64decode(issued["token"].split(".")[1] + "=="))
    assert raw["exp"] - raw["nbf"] == CFG.token_ttl_s

    async with http.post(
        f"{base}livekit/token", json={"room": "r9", "identity": "bob", "ttl_s": 10**6}, headers=auth
    ) as r:
        raw = json.loads(base64.urlsafe_b64decode((await r.json())["token"].split(".")[1] + "=="))
    assert raw["exp"] - raw["nbf"] == CFG.token_max_ttl_s
    bad = [
        {"room": "", "identity": "bob"},
        {"room": "r9"},
        {"room": "r9", "identity": CFG.agent_identity("s")},
    ]
    for body in bad:
        async with http.post(f"{base}livekit/token", json=body, headers=auth) as r:
            assert r.status == 400, body


async def test_sessions_endpoint_sends_the_agent_into_a_room(
    gateway: tuple[aiohttp.ClientSession, str], bus: Bus
) -> None:
    http, base = gateway
    async with http.post(f"{base}livekit/sessions", json={"room": "r10"}) as r:
        assert r.status == 401
    body = {"room": "r10", "participant": "carol", "agent": {"greeting": "Hello!"}}
    async with http.post(
        f"{base}livekit/sessions", json=body, headers={"Authorization": f"Bearer {APP_KEY}"}
    ) as r:
        assert r.status == 201
        created = await r.json()
    session = created["session"]
    assert session.startswith(room_prefix("r10")) and created["url"] == CFG.url
    spec = codec.decode_record(ev.SessionSpec, (await bus.kv[sj.SESSIONS_BUCKET].get(session)).value or b"")
    assert (spec.source, spec.sink, spec.source_uri, spec.sink_uri) == (
        "livekit",
        "livekit",
        "r10?participant=carol",
        "r10?participant=carol",
    )
    assert (spec.agent.greeting, spec.output_rate) == ("Hello!", 48_000)

    async with Tap(bus, session) as tap:  # LiveKit says the room is gone: its session ends
        _, reply = await post_webhook(http, base, *signed(event("room_finished", "r10", "RM_any")))
        assert reply["outcome"] == f"ended {session}"
        await tap.wait(ev.SessionEnded)


async def test_the_gateway_serves_the_livekit_routes_with_its_own_api_keys(bus: Bus) -> None:
    gateway = Gateway(bus, GatewayConfig(api_keys=(APP_KEY,), livekit=CFG))
    server = TestServer(gateway.app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            url = server.make_url("/livekit/token")
            async with http.post(url, json={"room": "r1", "identity": "dan"}) as r:
                assert r.status == 401
            headers = {"Authorization": f"Bearer {APP_KEY}"}
            async with http.post(url, json={"room": "r1", "identity": "dan"}, headers=headers) as r:
                assert r.status == 201 and (await r.json())["room"] == "r1"
            body, _ = signed(event("room_started", "support-1", "RM_x"))
            async with http.post(server.make_url("/livekit/webhook"), data=body) as r:
                assert r.status == 401
    finally:
        await server.close()


async def test_without_a_livekit_server_the_routes_say_so(bus: Bus) -> None:
    app = web.Application()
    LiveKitRoutes(bus, LiveKitConfig(), app_key, stages=()).register(app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {APP_KEY}"}
            async with http.post(
                server.make_url("/livekit/token"), json={"room": "r", "identity": "x"}, headers=headers
            ) as r:
                assert r.status == 503 and "LIVEKIT_URL" in await r.text()
    finally:
        await server.close()
