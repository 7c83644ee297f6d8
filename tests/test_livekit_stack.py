"""Sessions whose media edge is a LiveKit room: stage processes on the real bus, the fake LiveKit server.

The fake server runs in this process on a veth address (libwebrtc ignores loopback); the stages reach
it with LIVEKIT_URL. What is checked is what a call needs: the egress joins the room as the agent and
the room hears the reply frames of ``audio.out``, with the captions and states a LiveKit client shows.
Like the bridge tests, this proves the use of the SDK, not interoperability with every server version.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from proto import events as ev
from proto import subjects as sj
from proto.events import FRAME_MS
from services.livekit.captions import FINAL, STATE
from services.runtime.bus import Bus
from services.runtime.sessions import end_session, open_session
from services.tools.stack import Stack
from tests.fakes.livekit_media import dominant_hz, onsets, tone
from tests.fakes.livekit_sfu import Caller, FakeLiveKit, Room
from tests.support.tap import Tap

pytestmark = pytest.mark.slow

KEY, SECRET, ROOM = "APIkey1", "a-secret-of-at-least-32-characters!!", "support-call"
RATE = 48_000
N = RATE * FRAME_MS // 1000
#: The reply: 2 s of 660 Hz bursts (200 ms every 500 ms), a word at the start of each burst.
BURST, PERIOD, FRAMES = 10, 25, 100
WORDS = ("It", "is", "sunny", "today.")


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
        # the reply, published in real time as a streaming TTS would
        starts = []
        t0 = time.monotonic()
        for i, frame in enumerate(reply_frames(session_id, 1)):
            await asyncio.sleep(max(0.0, t0 + i * FRAME_MS / 1000 - time.monotonic()))
            if i % PERIOD == 0:
                starts.append(time.time())
            await bus.publish(sj.AUDIO_OUT, frame)
        await bus.publish(sj.AUDIO_OUT, ev.AgentAudioEnd(session=session_id, turn=1, frames=FRAMES))
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
