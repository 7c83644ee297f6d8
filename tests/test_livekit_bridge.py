"""The bridge's listener and agent, with the real ``livekit`` SDK, in a room of the fake LiveKit server.

The server runs in this process on the address of a veth interface made for the test (libwebrtc ignores
loopback; tests/support/netns.py). It proves the bridge's use of the SDK, not interoperability with
every LiveKit server version (see tests/fakes/livekit_sfu.py). Checked here: joining with the bridge's
tokens (the listener hidden), hearing the caller's microphone as 16 kHz 20 ms frames, the room hearing
the agent's voice, captions and agent state as LiveKit clients read them, and how a call ends.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest
from livekit.rtc import ConnectionState, DisconnectReason

from proto import events as ev
from proto.events import FRAME_MS, USER_RATE
from services.livekit.agent import AgentParticipant
from services.livekit.captions import FINAL, SEGMENT_ID, STATE, TOPIC, TRACK_ID
from services.livekit.config import LiveKitConfig
from services.livekit.link import RoomUnreachable
from services.livekit.listener import CallerListener
from services.livekit.room import RoomTarget
from services.tools.stack import free_port
from tests.fakes.livekit_media import dominant_hz, onsets, rms, tone
from tests.fakes.livekit_participant import Caller
from tests.fakes.livekit_sfu import FakeLiveKit, Room

pytestmark = pytest.mark.slow

KEY, SECRET, ROOM = "APIkey1", "a-secret-of-at-least-32-characters!!", "call-1"
RATE = 24_000
BURST_MS, PERIOD_MS = 200, 600


@pytest.fixture
async def server(veth_host: str) -> AsyncIterator[FakeLiveKit]:
    async with FakeLiveKit(Room(ROOM, KEY, SECRET), veth_host) as fake:
        yield fake


def config(server: FakeLiveKit, **overrides: float) -> LiveKitConfig:
    return LiveKitConfig(url=server.url, api_key=KEY, api_secret=SECRET, **overrides)  # type: ignore[arg-type]


@dataclass
class Ear:
    """What the listener handed on: 16 kHz samples with their arrival times."""

    frames: list[tuple[int, npt.NDArray[np.int16]]] = field(default_factory=list)
    got: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, samples: npt.NDArray[np.int16], at_ns: int) -> None:
        self.frames.append((at_ns, samples.copy()))
        self.got.set()

    def pcm(self) -> npt.NDArray[np.int16]:
        return np.concatenate([s for _, s in self.frames])

    async def wait_frames(self, n: int, timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.frames) < n:
                self.got.clear()
                await self.got.wait()


def latencies_ms(arrivals: list[int], starts: list[float]) -> list[float]:
    """For each onset that arrived, the delay since the nearest earlier burst start."""
    out = []
    for at in arrivals:
        earlier = [s for s in starts if s * 1e9 <= at]
        if earlier:
            out.append((at / 1e9 - max(earlier)) * 1000)
    return out


async def play_bursts(agent: AgentParticipant, turn: int, seconds: float) -> list[float]:
    """Play a reply of 660 Hz bursts, paced like the egress; returns when each burst's first frame went."""
    pcm = tone(seconds, 660.0, RATE)
    n = RATE * FRAME_MS // 1000
    period_frames, burst_frames = PERIOD_MS // FRAME_MS, BURST_MS // FRAME_MS
    starts = []
    t0 = time.monotonic()
    for i in range(len(pcm) // n):
        await asyncio.sleep(max(0.0, t0 + i * FRAME_MS / 1000 - time.monotonic()))
        loud = i % period_frames < burst_frames
        chunk = pcm[i * n : (i + 1) * n] if loud else np.zeros(n, np.int16)
        if loud and i % period_frames == 0:
            starts.append(time.time())
        frame = ev.AgentAudioFrame(
            session="s1", turn=turn, index=i, chunk=0, pcm=chunk.tobytes(), sample_rate=RATE
        )
        await agent.play(frame)
    return starts


async def test_the_bridge_hears_the_caller_and_the_room_hears_the_agent(server: FakeLiveKit) -> None:
    room, cfg, target = server.room, config(server), RoomTarget(ROOM)
    ear = Ear()
    listener = CallerListener(cfg, "s1", target, ear)
    agent = AgentParticipant(cfg, "s1", target, RATE)
    listening = asyncio.create_task(listener.run())
    speaking = asyncio.create_task(agent.run())
    try:
        assert await agent.joined(20)
        caller = Caller(hz=440.0, burst_ms=BURST_MS, period_ms=PERIOD_MS)
        await room.caller_joins(caller)
        await ear.wait_frames(150)  # 3 s of the caller
        starts = await play_bursts(agent, 1, 3.0)
        agent_id = cfg.agent_identity("s1")
        await room.wait(
            lambda: (
                len(room.heard.get(agent_id, None).loud_frames()) >= 25 if agent_id in room.heard else False
            )
        )
    finally:
        await listener.close()
        await agent.close()
        assert await listening == "closed"
        assert await speaking == DisconnectReason.CLIENT_INITIATED

    # joined with its tokens; the listener unseen by others
    assert {(identity, hidden) for identity, hidden, _ in room.joins} == {
        (cfg.listener_identity("s1"), True),
        (agent_id, False),
    }
    assert room.published == [(agent_id, "agent-voice", 2)]  # the agent's microphone
    # the caller's microphone, as the ingress takes it: 20 ms of 16 kHz mono per frame
    assert listener.caller == "caller"
    assert {len(samples) for _, samples in ear.frames} == {USER_RATE * FRAME_MS // 1000}
    loud = np.concatenate([s for _, s in ear.frames if rms(s) > 0.02])
    assert dominant_hz(loud, USER_RATE) == pytest.approx(440.0, abs=5.0)
    assert rms(loud) > 0.05
    # the agent's voice, as the room hears it
    heard = room.heard[agent_id]
    sound = np.concatenate([c for _, c in heard.loud_frames()])
    assert dominant_hz(sound, 48_000) == pytest.approx(660.0, abs=5.0)
    assert rms(sound) == pytest.approx(rms(tone(0.2, 660.0, RATE)), rel=0.3)
    # the agent said it was listening as soon as it was in
    assert room.attribute_log[0][:2] == (agent_id, {STATE: "listening"})

    join_ms = [1000 * (link.first_join_s or 0) for link in (listener.link, agent.link)]
    caller_starts = [caller.t0 + k * PERIOD_MS / 1000 for k in range(100)]
    into = latencies_ms(onsets(ear.frames), caller_starts)
    out = latencies_ms(heard.summary()["onsets_ns"], starts)
    assert into and out
    print(
        f"\njoin (listener, agent): {join_ms[0]:.0f} ms, {join_ms[1]:.0f} ms; "
        f"caller -> listener p50 {statistics.median(into):.0f} ms (n={len(into)}); "
        f"agent -> room p50 {statistics.median(out):.0f} ms (n={len(out)})"
    )


async def test_captions_and_state_follow_the_conversation(server: FakeLiveKit) -> None:
    room, cfg, target = server.room, config(server), RoomTarget(ROOM)
    await room.caller_joins(Caller(identity="alice", hz=300.0))
    agent = AgentParticipant(cfg, "s1", target, RATE)
    speaking = asyncio.create_task(agent.run())
    try:
        assert await agent.joined(20)
        say = [("Sure,", 0), ("it", 300), ("is", 500), ("sunny", 700), ("today.", 1100)]
        words = tuple(ev.WordTiming(text=w, start_ms=t, end_ms=t + 200) for w, t in say)
        agent.on_event(ev.Transcript(session="s1", turn=1, segment=0, text="is it", is_final=False))
        agent.on_event(ev.Transcript(session="s1", turn=1, segment=0, text="is it sunny", is_final=True))
        agent.on_event(
            ev.UserTurnEnded(
                session="s1",
                turn=1,
                text="is it sunny",
                start_ms=0,
                end_ms=900,
                speech_end_ts=1,
                endpointing_ms=0,
            )
        )
        agent.on_event(ev.PlayoutStarted(session="s1", turn=1))
        n = RATE * FRAME_MS // 1000
        for i in range(30):  # 600 ms of the reply play, then the caller barges in
            pcm = tone(0.02, 500.0, RATE)[:n].tobytes()
            await agent.play(
                ev.AgentAudioFrame(
                    session="s1",
                    turn=1,
                    index=i,
                    chunk=0,
                    pcm=pcm,
                    sample_rate=RATE,
                    words=words if i == 0 else (),
                )
            )
        agent.flush()
        agent.on_event(
            ev.PlayoutStopped(session="s1", turn=1, played_ms=600, heard_text="Sure, it is", completed=False)
        )
        await room.wait(lambda: sum(t.closed for t in room.texts) == 3 and len(room.attribute_log) >= 4)
    finally:
        await agent.close()
        await speaking

    interim, final, reply = room.texts
    caller_mic = room.caller.track_sid if room.caller else ""
    assert (interim.sender, interim.topic, interim.text) == ("alice", TOPIC, "is it")
    assert interim.attributes[FINAL] == "false" and interim.attributes[TRACK_ID] == caller_mic
    assert (final.sender, final.text, final.attributes[FINAL]) == ("alice", "is it sunny", "true")
    assert final.attributes[SEGMENT_ID] == interim.attributes[SEGMENT_ID]
    # the reply's caption: as far as it was heard when the caller cut in (words up to 600 ms), then final
    assert (reply.sender, reply.topic, reply.text) == (cfg.agent_identity("s1"), TOPIC, "Sure, it is")
    assert reply.attributes[FINAL] == "false" and reply.final_attributes[FINAL] == "true"
    states = [attrs[STATE] for _, attrs, _ in room.attribute_log]
    assert states == ["listening", "thinking", "speaking", "listening"]


async def test_the_call_ends_when_the_caller_leaves(server: FakeLiveKit) -> None:
    room, cfg = server.room, config(server)
    ear = Ear()
    listener = CallerListener(cfg, "s2", RoomTarget(ROOM, "bob"), ear)
    listening = asyncio.create_task(listener.run())
    await room.caller_joins(Caller(identity="eve", hz=500.0))  # not the one this session serves
    await room.caller_leaves()
    await room.caller_joins(Caller(identity="bob", hz=440.0))
    await ear.wait_frames(10)
    assert listener.caller == "bob"
    await room.caller_leaves()
    assert await asyncio.wait_for(listening, 20) == "hangup"
    assert cfg.listener_identity("s2") in room.left


async def test_the_call_ends_when_the_room_is_deleted(server: FakeLiveKit) -> None:
    room, cfg = server.room, config(server)
    await room.caller_joins(Caller())
    ear = Ear()
    listener = CallerListener(cfg, "s3", RoomTarget(ROOM), ear)
    agent = AgentParticipant(cfg, "s3", RoomTarget(ROOM), RATE)
    listening, speaking = asyncio.create_task(listener.run()), asyncio.create_task(agent.run())
    await ear.wait_frames(5)
    assert await agent.joined(20)
    await room.end()
    assert await asyncio.wait_for(listening, 20) == "hangup"
    assert await asyncio.wait_for(speaking, 20) == DisconnectReason.ROOM_DELETED
    await agent.close()


async def test_no_caller_ends_the_call_for_inactivity(server: FakeLiveKit) -> None:
    listener = CallerListener(config(server, caller_timeout_s=1.0), "s4", RoomTarget(ROOM), Ear())
    assert await asyncio.wait_for(listener.run(), 20) == "inactivity"


async def test_a_successor_takes_the_agents_place_in_the_room(server: FakeLiveKit) -> None:
    room, cfg = server.room, config(server)
    first = AgentParticipant(cfg, "s5", RoomTarget(ROOM), RATE)
    second = AgentParticipant(cfg, "s5", RoomTarget(ROOM), RATE)
    running = asyncio.create_task(first.run())
    assert await first.joined(20)
    successor = asyncio.create_task(second.run())
    try:
        assert await asyncio.wait_for(running, 20) == DisconnectReason.DUPLICATE_IDENTITY
        assert await second.joined(20)
        assert [c.identity for c in room.clients.values()] == [cfg.agent_identity("s5")]
    finally:
        await first.close()
        await second.close()
        await successor


def connected(link_room: object) -> bool:
    return getattr(link_room, "connection_state", None) == ConnectionState.CONN_CONNECTED


async def test_the_listener_rides_out_the_sdks_reconnects(
    server: FakeLiveKit, caplog: pytest.LogCaptureFixture
) -> None:
    room, cfg = server.room, config(server)
    await room.caller_joins(Caller(hz=440.0))
    ear = Ear()
    listener = CallerListener(cfg, "s6", RoomTarget(ROOM), ear)
    identity = cfg.listener_identity("s6")
    listening = asyncio.create_task(listener.run())
    try:
        await ear.wait_frames(10)
        with caplog.at_level("INFO", logger="voicebus.livekit"):
            # signalling cut: the SDK resumes the same session, the media never stopped
            await room.drop(identity)
            await room.wait(lambda: room.resumes == [identity] and connected(listener.link.room))
            await ear.wait_frames(len(ear.frames) + 25)
            # told to reconnect from scratch: the SDK joins again and says the caller left and came back
            await room.restart(identity)
            await room.wait(lambda: [i for i, _, _ in room.joins].count(identity) == 2)
            await ear.wait_frames(len(ear.frames) + 150)  # the caller is heard again, past the grace
        assert not listening.done() and listener.caller == "caller"
        messages = [r.getMessage() for r in caplog.records if r.name == "voicebus.livekit"]
        assert any("the SDK is reconnecting" in m for m in messages)
        assert any("resumed" in m for m in messages)
        await room.caller_leaves()  # a real hang-up still ends the call
        assert await asyncio.wait_for(listening, 20) == "hangup"
    finally:
        await listener.close()
        await asyncio.gather(listening, return_exceptions=True)


async def test_the_agent_is_heard_again_after_the_sdk_rejoins(server: FakeLiveKit) -> None:
    room, cfg = server.room, config(server)
    agent = AgentParticipant(cfg, "s7", RoomTarget(ROOM), RATE)
    identity = cfg.agent_identity("s7")
    speaking = asyncio.create_task(agent.run())
    try:
        assert await agent.joined(20)
        agent.on_event(ev.PlayoutStarted(session="s7", turn=1))
        await play_bursts(agent, 1, 1.2)
        await room.wait(lambda: identity in room.heard and len(room.heard[identity].loud_frames()) >= 10)
        await room.restart(identity)
        await room.wait(
            lambda: [i for i, _, _ in room.joins].count(identity) == 2 and connected(agent.link.room)
        )
        heard_before = len(room.heard[identity].loud_frames())
        await play_bursts(agent, 2, 1.2)
        await room.wait(lambda: len(room.heard[identity].loud_frames()) >= heard_before + 10)
        await room.wait(lambda: len(room.attribute_log) >= 3)
    finally:
        await agent.close()
        await speaking
    assert not speaking.exception()
    assert [i for i, _, _ in room.joins].count(identity) == 2
    assert room.published.count((identity, "agent-voice", 2)) == 2  # the SDK published the voice again
    # the state is said again to the new session: speaking
    assert room.attribute_log[-1][:2] == (identity, {STATE: "speaking"})


async def test_a_room_that_cannot_be_joined_is_given_up_or_left_when_closed() -> None:
    nowhere = f"ws://127.0.0.1:{free_port()}"  # nothing listens: every join fails at once
    cfg = LiveKitConfig(url=nowhere, api_key=KEY, api_secret=SECRET, rejoin_s=1.0)
    with pytest.raises(RoomUnreachable, match="could not join room"):
        await asyncio.wait_for(CallerListener(cfg, "s8", RoomTarget(ROOM), Ear()).run(), 20)

    patient = LiveKitConfig(url=nowhere, api_key=KEY, api_secret=SECRET, rejoin_s=600.0)
    agent = AgentParticipant(patient, "s8", RoomTarget(ROOM), RATE)
    trying = asyncio.create_task(agent.run())
    await agent.close()  # while it is still trying: it stops
    assert await asyncio.wait_for(trying, 20) == DisconnectReason.CLIENT_INITIATED
