"""LiveKit access tokens: what each participant is granted, and which tokens may not join a room.

A refused token is refused twice: by livekit-api's ``TokenVerifier`` with the grant checks a server
makes, and by the fake LiveKit server, which the real SDK then fails to join (signalling only, so
loopback is enough here).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging

import jwt
import pytest
from livekit import api, rtc

from services.livekit.config import LiveKitConfig
from services.livekit.link import RoomUnreachable
from services.livekit.listener import CallerListener
from services.livekit.room import RoomTarget
from services.livekit.tokens import agent_token, caller_token, listener_token
from tests.fakes.livekit_sfu import FakeLiveKit, Refused, Room

KEY, SECRET, ROOM = "APIkey1", "a-secret-of-at-least-32-characters!!", "support-1"
CFG = LiveKitConfig(url="ws://127.0.0.1:7880", api_key=KEY, api_secret=SECRET)


def may_join(token: str, room: str, secret: str = SECRET) -> api.Claims:
    """What a server checks: signature, expiry (no leeway), a room-join grant for this room."""
    claims = api.TokenVerifier(KEY, secret, leeway=datetime.timedelta(0)).verify(token)
    if claims.video is None or not claims.video.room_join:
        raise PermissionError("no room join grant")
    if claims.video.room != room:
        raise PermissionError(f"token for room {claims.video.room!r}")
    return claims


def test_each_participant_gets_only_what_it_uses() -> None:
    listener = may_join(listener_token(CFG, ROOM, "s1"), ROOM)
    assert listener.identity == CFG.listener_identity("s1")
    assert listener.video is not None
    assert listener.video.hidden and listener.video.can_subscribe
    assert not listener.video.can_publish and not listener.video.can_publish_data

    agent = may_join(agent_token(CFG, ROOM, "s1"), ROOM)
    assert (agent.identity, agent.kind, agent.name) == (CFG.agent_identity("s1"), "agent", CFG.agent_name)
    assert agent.video is not None
    assert agent.video.can_publish and agent.video.can_publish_sources == ["microphone"]
    assert agent.video.can_publish_data and agent.video.can_update_own_metadata
    assert not agent.video.can_subscribe and not agent.video.hidden

    token = caller_token(CFG, ROOM, "alice", "Alice", ttl_s=120)
    caller = may_join(token, ROOM)
    assert (caller.identity, caller.name) == ("alice", "Alice")
    assert caller.video is not None and caller.video.can_subscribe and caller.video.can_publish
    raw = jwt.decode(token, options={"verify_signature": False})
    assert raw["exp"] - raw["nbf"] == 120


def _refused_tokens() -> dict[str, tuple[str, str]]:
    """Tokens that must not join ROOM, and what a server should say about each."""

    def token(
        secret: str = SECRET, ttl_s: float = 60, grants: api.VideoGrants | None = None, identity: str = "eve"
    ) -> str:
        t = api.AccessToken(KEY, secret).with_identity(identity).with_ttl(datetime.timedelta(seconds=ttl_s))
        return t.with_grants(grants).to_jwt() if grants else t.to_jwt()

    join = api.VideoGrants(room_join=True, room=ROOM)
    return {
        "expired": (token(ttl_s=-5, grants=join), "ExpiredSignatureError"),
        "wrong secret": (
            token(secret="another-secret-of-32-characters!!!!", grants=join),
            "InvalidSignatureError",
        ),
        "wrong room": (caller_token(CFG, "another-room", "eve", "", 60), "room 'another-room'"),
        "no room join": (token(grants=api.VideoGrants(room=ROOM, can_subscribe=True)), "roomJoin"),
        "no grants at all": (token(), "roomJoin"),
    }


CASES = list(_refused_tokens())  # the tokens themselves are made when a test runs: they expire


@pytest.mark.parametrize("case", CASES)
def test_refused_by_the_token_verifier(case: str) -> None:
    token, _ = _refused_tokens()[case]
    with pytest.raises((jwt.PyJWTError, PermissionError)):
        may_join(token, ROOM)


@pytest.mark.parametrize("case", CASES)
async def test_refused_by_the_server_and_the_sdk_cannot_join(case: str) -> None:
    token, why = _refused_tokens()[case]
    room = Room(ROOM, KEY, SECRET)
    with pytest.raises(Refused, match=why):
        room.check(token)
    async with FakeLiveKit(room, "127.0.0.1") as server:
        client = rtc.Room()
        with pytest.raises(rtc.ConnectError):
            await client.connect(server.url, token, rtc.RoomOptions(connect_timeout=5.0))
    assert room.refusals and why in room.refusals[0]
    assert not room.joins


def test_a_token_the_bridge_mints_passes_the_server_check() -> None:
    room = Room(ROOM, KEY, SECRET)
    for token in (
        listener_token(CFG, ROOM, "s1"),
        agent_token(CFG, ROOM, "s1"),
        caller_token(CFG, ROOM, "a", "", 60),
    ):
        assert room.check(token).identity


async def test_neither_the_secret_nor_a_token_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    room = Room(ROOM, KEY, SECRET)
    wrong = LiveKitConfig(url="", api_key=KEY, api_secret="another-secret-of-32-characters!!!!", rejoin_s=0.5)
    with caplog.at_level(logging.DEBUG):
        async with FakeLiveKit(room, "127.0.0.1") as server:
            cfg = dataclasses.replace(wrong, url=server.url)
            listener = CallerListener(cfg, "s1", RoomTarget(ROOM), lambda samples, at: asyncio.sleep(0))
            with pytest.raises(RoomUnreachable) as refused:
                await asyncio.wait_for(listener.run(), 20)
            logging.getLogger("voicebus.livekit").info("settings: %r", cfg)
    assert room.refusals  # the server was asked, and said no
    logged = "\n".join([str(refused.value), *(r.getMessage() for r in caplog.records)])
    assert "as listener failed" in logged and "settings: LiveKitConfig(" in logged
    assert cfg.api_secret not in logged and "eyJ" not in logged  # no secret, no JWT
