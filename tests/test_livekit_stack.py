"""Sessions whose media edge is a LiveKit room: stage processes on the real bus, the fake LiveKit server.

The fake server runs in this process on a veth address (libwebrtc ignores loopback); the stages reach
it with LIVEKIT_URL. What is checked is what a call needs: the ingress hears the caller's microphone
and puts it on ``audio.in`` (the VAD finds the speech), the egress joins as the agent and the room
hears the reply frames of ``audio.out``, with the captions and states a LiveKit client shows, and the
call ends when the caller hangs up.
Like the bridge tests, this proves the use of the SDK, not interoperability with every server version.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from proto import events as ev
from proto import subjects as sj
from proto.events import FRAME_MS
from services.livekit.captions import FINAL, STATE
from services.runtime.bus import Bus
from services.runtime.sessions import end_session, open_session
from services.tools.stack import Stack, free_port
from tests.fakes.livekit_media import dominant_hz, onsets, tone
from tests.fakes.livekit_participant import Caller
from tests.fakes.livekit_sfu import FakeLiveKit, Room
from tests.support.agent_audio import pack
from tests.support.tap import Tap

pytestmark = pytest.mark.slow

KEY, SECRET, ROOM = "APIkey1", "a-secret-of-at-least-32-characters!!", "support-call"
RATE = 48_000
N = RATE * FRAME_MS // 1000
#: The reply: 2 s of 660 Hz bursts (200 ms every 500 ms), a word at the start of each burst.
BURST, PERIOD, FRAMES = 10, 25, 100
WORDS = ("It", "is", "sunny", "today.")
SPEECH = Path(__file__).parent / "data" / "speech_1500ms_16k.wav"


@pytest.fixture
async def server(veth_host: str) -> AsyncIterator[FakeLiveKit]:
    async with FakeLiveKit(Room(ROOM, KEY, SECRET), veth_host) as fake:
        yield fake


def livekit_env(server: FakeLiveKit) -> dict[str, str]:
    return {"LIVEKIT_URL": server.url, "LIVEKIT_API_KEY": KEY, "LIVEKIT_API_SECRET": SECRET}


def reply_frames(session: str, turn: int) -> list[ev.AgentAudioFrame]:
    pcm = tone(FRAMES * FRAME_MS / 1000, 660.0, RATE)
    out = []
    for i in range(FRAMES):
        loud = i % PERIOD < BURST
        words: tuple[ev.WordTiming, ...] = ()
        if i == 0:
            words = tuple(
                ev.WordTiming(text=w, start_ms=k * PERIOD * FRAME_MS, end_ms=(k * PERIOD + BURST) * FRAME_MS)
                for k, w in enumerate(WORDS)
            )
        chunk = pcm[i * N : (i + 1) * N] if loud else np.zeros(N, np.int16)
        out.append(
            ev.AgentAudioFrame(
                session=session,
                turn=turn,
                index=i,
                chunk=0,
                pcm=chunk.tobytes(),
                sample_rate=RATE,
                words=words,
            )
        )
    return out


async def speak_reply(bus: Bus, session: str) -> list[float]:
    """The reply, published in real time as a streaming TTS would; returns when each burst went out."""
    starts = []
    t0 = time.monotonic()
    for i, frame in enumerate(reply_frames(session, 1)):
        await asyncio.sleep(max(0.0, t0 + i * FRAME_MS / 1000 - time.monotonic()))
        if i % PERIOD == 0:
            starts.append(time.time())
        await bus.publish(sj.AUDIO_OUT, *pack([frame]))  # each frame as soon as it exists
    await bus.publish(sj.AUDIO_OUT, ev.AgentAudioEnd(session=session, turn=1, frames=FRAMES))
    return starts


async def test_the_egress_speaks_into_the_room_as_the_agent(
    stack: Stack, bus: Bus, session_id: str, server: FakeLiveKit
) -> None:
    room = server.room
    await room.caller_joins(Caller(identity="alice", hz=300.0))
    await stack.wait_ready_async([stack.spawn("egress", env=livekit_env(server))])
    agent = f"voicebus-agent-{session_id}"
    spec = ev.SessionSpec(session=session_id, sink="livekit", sink_uri=ROOM, output_rate=RATE)
    async with Tap(bus, session_id) as tap:
        await open_session(bus, spec, stages=("egress",))
        await room.wait(lambda: (agent, "agent-voice", 2) in room.published)
        # the caller's words and the end of their turn, as stt says them
        await bus.publish(
            sj.TRANSCRIPT, ev.Transcript(session=session_id, turn=1, segment=0, text="hi", is_final=True)
        )
        await bus.publish(
            sj.TURN,
            ev.UserTurnEnded(
                session=session_id,
                turn=1,
                text="hi",
                start_ms=0,
                end_ms=500,
                speech_end_ts=1,
                endpointing_ms=0,
            ),
        )
        starts = await speak_reply(bus, session_id)
        (stopped,) = await tap.wait(ev.PlayoutStopped, timeout=20)
        await room.wait(lambda: sum(t.closed for t in room.texts) == 2 and len(room.attribute_log) >= 4)
        await end_session(bus, session_id)
        await room.wait(lambda: agent in room.left)

    assert stopped.completed and not tap.of(ev.ErrorEvent)
    heard = room.heard[agent]
    loud = heard.loud_frames()
    assert len(loud) >= 0.9 * BURST * FRAMES / PERIOD  # 20 ms frames at 48 kHz, as the egress played them
    assert dominant_hz(np.concatenate([c for _, c in loud]), RATE) == pytest.approx(660.0, abs=5.0)
    caller_caption, agent_caption = room.texts
    assert (caller_caption.sender, caller_caption.text, caller_caption.attributes[FINAL]) == (
        "alice",
        "hi",
        "true",
    )
    assert (agent_caption.sender, agent_caption.text) == (agent, " ".join(WORDS))
    assert agent_caption.final_attributes[FINAL] == "true"
    assert [a[STATE] for _, a, _ in room.attribute_log] == ["listening", "thinking", "speaking", "listening"]

    out = [(at / 1e9 - start) * 1000 for at, start in zip(onsets(heard.chunks), starts)]
    print(f"\naudio.out -> heard in the room: p50 {statistics.median(out):.0f} ms (n={len(out)})")


def padded_speech(folder: Path, lead_s: float = 1.0, tail_s: float = 3.0) -> tuple[Path, float]:
    """The test speech with silence around it (so the caller's first words are not what a late
    subscriber misses); returns the file and how long the speech lasts."""
    with wave.open(str(SPEECH), "rb") as w:
        rate, speech = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), np.int16)
    path = folder / "caller.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(
            np.concatenate(
                (np.zeros(int(lead_s * rate), np.int16), speech, np.zeros(int(tail_s * rate), np.int16))
            ).tobytes()
        )
    return path, len(speech) / rate


async def test_a_call_in_a_room_goes_through_ingress_and_egress(
    stack: Stack, bus: Bus, session_id: str, server: FakeLiveKit, tmp_path: Path
) -> None:
    room, env = server.room, livekit_env(server)
    await stack.wait_ready_async([stack.spawn("ingress", env=env), stack.spawn("egress", env=env)])
    listener, agent = f"voicebus-listener-{session_id}", f"voicebus-agent-{session_id}"
    target = f"{ROOM}?participant=carol"
    spec = ev.SessionSpec(
        session=session_id,
        source="livekit",
        source_uri=target,
        sink="livekit",
        sink_uri=target,
        output_rate=RATE,
    )
    wav, speech_s = padded_speech(tmp_path)
    async with Tap(bus, session_id) as tap:
        await open_session(bus, spec, stages=("ingress", "egress"))
        await room.wait(lambda: listener in {c.identity for c in room.clients.values()})
        caller = Caller(identity="carol", wav=str(wav))
        await room.caller_joins(caller)
        # the caller's words reach audio.in as 20 ms frames and the VAD finds them (each speech event
        # comes twice: in-band on audio.in and on speech)
        started = (await tap.wait(ev.SpeechStarted, timeout=30))[0]
        await tap.wait(ev.SpeechStopped, timeout=30)
        # the agent answers: its frames come back to the room
        starts = await speak_reply(bus, session_id)
        await tap.wait(ev.PlayoutStopped, timeout=20)
        await room.wait(lambda: agent in room.heard and len(room.heard[agent].loud_frames()) >= 36)
        # the caller hangs up: the ingress ends the call, both of the bridge's participants leave
        await room.caller_leaves()
        (ended,) = await tap.wait(ev.SessionEnded, timeout=20)
        await room.wait(lambda: {listener, agent} <= set(room.left))

    assert ended.reason == "hangup"
    assert {(i, hidden) for i, hidden, _ in room.joins} == {(listener, True), (agent, False)}
    frames = tap.frames()
    assert [f.index for f in frames] == list(range(len(frames)))  # one frame per 20 ms, none lost
    # the VAD may cut the speech at its pauses; together its segments span the speech
    last = max(tap.of(ev.SpeechStopped), key=lambda e: e.end_ms)
    assert (last.end_ms - started.start_ms) / 1000 == pytest.approx(speech_s, abs=0.35)
    loud = [f for f in frames if np.sqrt(np.mean(np.frombuffer(f.pcm, np.int16).astype(float) ** 2)) > 300]
    assert len(loud) * FRAME_MS / 1000 == pytest.approx(speech_s, abs=0.4)

    into = (loud[0].ts / 1e9 - (caller.t0 + 1.0)) * 1000  # the speech starts 1 s into the file
    out = [(at / 1e9 - start) * 1000 for at, start in zip(onsets(room.heard[agent].chunks), starts)]
    print(
        f"\ncaller's first word -> its frame on audio.in: {into:.0f} ms; "
        f"audio.out -> heard in the room: p50 {statistics.median(out):.0f} ms (n={len(out)})"
    )


async def test_a_room_session_where_livekit_is_not_configured_is_refused_clearly(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await stack.wait_ready_async([stack.spawn("ingress"), stack.spawn("egress")])
    spec = ev.SessionSpec(
        session=session_id, source="livekit", source_uri=ROOM, sink="livekit", sink_uri=ROOM
    )
    async with Tap(bus, session_id) as tap:
        await open_session(bus, spec, stages=("ingress", "egress"))
        (ended,) = await tap.wait(ev.SessionEnded, timeout=20)
        await tap.wait(ev.ErrorEvent, count=2)
    assert ended.reason == "error"
    errors = {e.stage: e.message for e in tap.of(ev.ErrorEvent)}
    assert "LiveKit is not configured here (LIVEKIT_URL)" in errors["ingress"]
    assert "LiveKit is not configured here (LIVEKIT_URL)" in errors["egress"]


async def test_a_room_that_cannot_be_reached_ends_the_session_as_an_error(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    nowhere = {
        "LIVEKIT_URL": f"ws://127.0.0.1:{free_port()}",
        "LIVEKIT_API_KEY": KEY,
        "LIVEKIT_API_SECRET": SECRET,
        "VB_LIVEKIT_REJOIN_S": "1",
        "VB_LIVEKIT_JOIN_TIMEOUT": "1",
    }
    await stack.wait_ready_async([stack.spawn("ingress", env=nowhere), stack.spawn("egress", env=nowhere)])
    spec = ev.SessionSpec(
        session=session_id, source="livekit", source_uri=ROOM, sink="livekit", sink_uri=ROOM
    )
    async with Tap(bus, session_id) as tap:
        await open_session(bus, spec, stages=("ingress", "egress"))
        (ended,) = await tap.wait(ev.SessionEnded, timeout=30)
    assert ended.reason == "error"
    (report,) = [e for e in tap.of(ev.ErrorEvent) if e.stage == "ingress"]
    assert report.code == "provider" and report.retryable and "could not join room" in report.message
