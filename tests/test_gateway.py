"""The gateway's API on the real bus: errors clients get, auth, CORS, events, and SDP relayed to the owner.

The gateway reads the session registry and relays offers; these tests register sessions in the registry
themselves and stand in for the owning replica with a ``PeerLeg`` in the test process (the real stage
processes are in test_webrtc_stages.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection
from nats.aio.msg import Msg
from nats.js.errors import NoKeysError

from proto import codec
from proto import events as ev
from proto import subjects as sj
from proto.system import SdpAnswer
from services.gateway.app import Gateway
from services.gateway.auth import session_token
from services.gateway.config import GatewayConfig
from services.runtime.bus import Bus
from services.runtime.config import load
from services.tools.stack import Stack, free_port
from services.webrtc.peer import PeerLeg
from services.webrtc.voice import AgentTrack, AgentVoice
from tests.support.tap import Tap
from tests.support.webrtc import SamplesTrack, play, publish, rms, tone


@contextlib.asynccontextmanager
async def serving(bus: Bus, **settings: Any) -> AsyncIterator[str]:
    """The gateway app in this process on a free port; yields its base URL."""
    cfg = load(GatewayConfig, environ={}, host="127.0.0.1", port=0, **settings)
    runner = web.AppRunner(Gateway(bus, cfg).app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def register(bus: Bus, session: str, **fields: Any) -> ev.SessionSpec:
    """Put a session in the registry as ``open_session`` does (no stage serves it)."""
    spec = ev.SessionSpec(session=session, **{"source": "webrtc", "sink": "webrtc", **fields})
    await bus.kv[sj.SESSIONS_BUCKET].put(session, codec.encode(spec))
    return spec


async def an_offer() -> str:
    """A real browser-like audio offer."""
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return str(sdp)


SDP = {"Content-Type": "application/sdp"}


async def test_unknown_sessions_are_404(bus: Bus, http: aiohttp.ClientSession, session_id: str) -> None:
    async with serving(bus) as url:
        for method, path in [
            ("POST", f"/whip/{session_id}"),
            ("POST", f"/whep/{session_id}"),
            ("DELETE", f"/sessions/{session_id}"),
            ("GET", f"/sessions/{session_id}/events"),
            ("POST", "/whip/..%2Fetc"),
            ("POST", "/whip/" + "x" * 65),
        ]:
            async with http.request(method, url + path, data="v=0\r\nm=audio ", headers=SDP) as r:
                assert r.status == 404, (method, path, r.status, await r.text())


async def test_bad_requests_are_refused_before_any_relay(
    bus: Bus, http: aiohttp.ClientSession, session_id: str
) -> None:
    await register(bus, session_id)
    async with serving(bus) as url:
        whip = f"{url}/whip/{session_id}"
        async with http.post(whip, data="hello", headers=SDP) as r:
            assert r.status == 400
            assert "not an SDP offer" in await r.text()
        async with http.post(whip, data=await an_offer(), headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
        async with http.post(whip, data="v=0\r\nm=audio " + "x" * 70_000, headers=SDP) as r:
            assert r.status == 413
        async with http.post(url + "/sessions", data="{not json") as r:
            assert r.status == 400


async def test_an_offer_the_owner_cannot_answer_is_400(
    bus: Bus, http: aiohttp.ClientSession, session_id: str
) -> None:
    await register(bus, session_id)

    async def ignore(_: object) -> None:
        return None

    leg = PeerLeg(bus, "ingress", session_id, receive=ignore)
    await leg.start()
    # looks like SDP with audio, but aiortc cannot use it (no RTCP multiplexing)
    offer = (await an_offer()).replace("a=rtcp-mux\r\n", "")
    try:
        async with serving(bus) as url, http.post(f"{url}/whip/{session_id}", data=offer, headers=SDP) as r:
            assert r.status == 400
            assert "RTCP mux" in await r.text()
    finally:
        await leg.close()


async def test_no_owner_answering_is_503(bus: Bus, http: aiohttp.ClientSession, session_id: str) -> None:
    await register(bus, session_id)
    async with serving(bus, signal_timeout_s=0.3) as url:
        for leg in ("whip", "whep"):
            async with http.post(f"{url}/{leg}/{session_id}", data=await an_offer(), headers=SDP) as r:
                assert r.status == 503
                assert r.headers["Retry-After"] == "1"
                assert ("ingress" if leg == "whip" else "egress") in await r.text()


async def test_a_leg_that_is_not_webrtc_is_409(
    bus: Bus, http: aiohttp.ClientSession, session_id: str
) -> None:
    await register(bus, session_id, source="bus")
    async with serving(bus, signal_timeout_s=0.2) as url:
        async with http.post(f"{url}/whip/{session_id}", data=await an_offer(), headers=SDP) as r:
            assert r.status == 409
            assert "ingress" in await r.text()
        async with http.post(f"{url}/whep/{session_id}", data=await an_offer(), headers=SDP) as r:
            assert r.status == 503  # the sink is WebRTC: relayed, and nobody owns it here


async def registered(bus: Bus) -> set[str]:
    """Session ids in the registry."""
    try:
        return set(await bus.kv[sj.SESSIONS_BUCKET].keys())
    except NoKeysError:
        return set()


async def test_opening_without_stages_is_503_and_leaves_no_session(
    bus: Bus, http: aiohttp.ClientSession
) -> None:
    before = await registered(bus)
    async with serving(bus, open_timeout_s=0.5) as url, http.post(url + "/sessions") as r:
        assert r.status == 503
        assert "not available" in await r.text()
    assert await registered(bus) == before


async def test_api_keys_and_session_tokens(bus: Bus, http: aiohttp.ClientSession, session_id: str) -> None:
    await register(bus, session_id)
    other = f"{session_id}x"
    await register(bus, other)
    async with serving(bus, api_keys=("k-one", "k-two"), open_timeout_s=0.3, signal_timeout_s=0.2) as url:
        async with http.post(url + "/sessions") as r:
            assert r.status == 401
        async with http.post(url + "/sessions", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with http.post(url + "/sessions", headers={"Authorization": "Bearer k-two"}) as r:
            assert r.status == 503  # allowed in; no stages run here
        offer = await an_offer()
        whip = f"{url}/whip/{session_id}"
        async with http.post(whip, data=offer, headers=SDP) as r:
            assert r.status == 401
        wrong = session_token("k-one", other)
        async with http.post(whip, data=offer, headers={**SDP, "Authorization": f"Bearer {wrong}"}) as r:
            assert r.status == 401
        own = session_token("k-one", session_id)
        async with http.post(whip, data=offer, headers={**SDP, "Authorization": f"Bearer {own}"}) as r:
            assert r.status == 503  # past the check, nobody owns it
        async with http.get(f"{url}/sessions/{session_id}/events?token=ünïcode") as r:
            assert r.status == 401


async def test_cors_preflight_and_exposed_location(
    bus: Bus, http: aiohttp.ClientSession, session_id: str
) -> None:
    await register(bus, session_id)
    origin = {"Origin": "https://app.example"}
    async with serving(bus, cors_origins=("https://app.example",)) as url:
        async with http.options(f"{url}/whip/{session_id}", headers=origin) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        async with http.post(f"{url}/whip/{session_id}", data="hello", headers={**SDP, **origin}) as r:
            assert r.status == 400  # errors carry the CORS headers too, so the page can read them
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "Location" in r.headers["Access-Control-Expose-Headers"]
        async with http.options(f"{url}/whip/{session_id}", headers={"Origin": "https://evil.example"}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers


async def test_delete_ends_the_session(bus: Bus, http: aiohttp.ClientSession, session_id: str) -> None:
    await register(bus, session_id)
    async with Tap(bus, session_id) as tap, serving(bus) as url:
        async with http.delete(f"{url}/sessions/{session_id}") as r:
            assert r.status == 200
        ended = await tap.wait(ev.SessionEnded)
        assert ended[0].reason == "hangup"
        async with http.post(f"{url}/whip/{session_id}", data=await an_offer(), headers=SDP) as r:
            assert r.status == 404


async def read_events(response: aiohttp.ClientResponse, count: int) -> list[tuple[int, dict[str, Any]]]:
    """Parse ``count`` server-sent events (id, JSON data), skipping keep-alive comments."""
    got: list[tuple[int, dict[str, Any]]] = []
    event_id = 0
    async with asyncio.timeout(10):
        while len(got) < count:
            line = (await response.content.readline()).decode().rstrip("\n")
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                got.append((event_id, json.loads(line[6:])))
    return got


async def test_events_follow_the_conversation_and_resume(
    bus: Bus, http: aiohttp.ClientSession, session_id: str
) -> None:
    await register(bus, session_id)
    said = ev.Transcript(session=session_id, turn=1, segment=0, text="hello there", is_final=True)
    await bus.publish(sj.TRANSCRIPT, said)
    await bus.publish(sj.CONTROL, ev.ControlAck(session=session_id, stage="tts", replica="r", acked="Resume"))
    await bus.publish(sj.REPLY, ev.ReplyChunk(session=session_id, turn=1, index=0, text="Hi!", last=True))
    async with serving(bus) as url:
        events_url = f"{url}/sessions/{session_id}/events"
        async with http.get(events_url) as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            (first_id, first), (_, second) = await read_events(r, 2)
        assert msgspec.convert(first, ev.Transcript) == msgspec.structs.replace(
            said, seq=first["seq"], ts=first["ts"]
        )
        assert second["type"] == "ReplyChunk"  # the ack in between is not for the page
        async with http.get(events_url, headers={"Last-Event-ID": str(first_id)}) as r:
            await bus.publish(sj.CONTROL, ev.SessionEnded(session=session_id))
            resumed = [e["type"] for _, e in await read_events(r, 2)]
            assert resumed == ["ReplyChunk", "SessionEnded"]
            assert (await r.content.read()).strip() == b""  # the stream closes with the session


async def test_whip_and_whep_reach_the_owners_legs(
    bus: Bus, http: aiohttp.ClientSession, session_id: str
) -> None:
    """The caller's audio reaches the ingress-side leg, the agent's voice reaches the caller."""
    await register(bus, session_id)
    received: list[np.ndarray] = []
    got_audio = asyncio.Event()

    async def receive(track: Any) -> None:
        while True:
            frame = await track.recv()
            samples = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
            received.append(samples)
            if rms(samples) > 0.05:
                got_audio.set()

    voice = AgentVoice(48_000, max_frames=5)
    mic = PeerLeg(bus, "ingress", session_id, receive=receive)
    speaker = PeerLeg(bus, "egress", session_id, send=lambda: AgentTrack(voice))
    await mic.start()
    await speaker.start()
    try:
        async with (
            serving(bus) as url,
            publish(http, f"{url}/whip/{session_id}", SamplesTrack(tone(3.0))),
            play(http, f"{url}/whep/{session_id}") as (_, heard),
        ):
            async with asyncio.timeout(20):
                await got_audio.wait()
            speech = tone(1.0, hz=300)
            for i in range(0, len(speech), 960):
                voice.push(speech[i : i + 960].tobytes())
                await asyncio.sleep(0.02)  # the egress's real-time pace
            loud = await heard.wait_loud(10)
        assert len(loud) >= 10
        assert max(rms(s) for s in received) > 0.1
    finally:
        await mic.close()
        await speaker.close()


async def test_the_gateway_process_serves_the_page_and_the_api(
    stack: Stack, http: aiohttp.ClientSession, session_id: str, bus: Bus
) -> None:
    port = free_port()
    gateway = stack.spawn("gateway", env={"VB_GATEWAY_PORT": str(port), "VB_GATEWAY_OPEN_TIMEOUT": "0.5"})
    await stack.wait_ready_async([gateway])
    url = f"http://127.0.0.1:{port}"
    async with http.get(url + "/") as r:
        assert r.status == 200
        page = await r.text()
        assert 'id="talk"' in page
        assert "/static/app.js" in page
    for asset in ("/static/app.js", "/static/style.css"):
        async with http.get(url + asset) as r:
            assert r.status == 200
    await register(bus, session_id)
    async with http.post(f"{url}/whip/{session_id}", data="hello", headers=SDP) as r:
        assert r.status == 400
    async with http.post(url + "/sessions") as r:
        assert r.status == 503


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (SdpAnswer(session="placeholder", ok=False, error="not_served", reason="session ended"), 404),
        (SdpAnswer(session="placeholder", ok=False, error="internal", reason="RuntimeError"), 502),
        (b"\xc1 not msgpack", 502),
    ],
)
async def test_what_the_owner_answers_maps_to_http(
    bus: Bus, http: aiohttp.ClientSession, session_id: str, answer: SdpAnswer | bytes, status: int
) -> None:
    await register(bus, session_id)

    async def owner(msg: Msg) -> None:
        reply = answer if isinstance(answer, bytes) else msgspec.structs.replace(answer, session=session_id)
        await msg.respond(reply if isinstance(reply, bytes) else codec.encode(reply))

    sub = await bus.nc.subscribe(sj.SIGNAL.session_subject("ingress", session_id), cb=owner)
    try:
        async with (
            serving(bus) as url,
            http.post(f"{url}/whip/{session_id}", data=await an_offer(), headers=SDP) as r,
        ):
            assert r.status == status, await r.text()
    finally:
        await sub.unsubscribe()
