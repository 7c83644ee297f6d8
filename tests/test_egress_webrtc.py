"""WHEP out of a real egress process, over the real bus and gateway: the agent's voice reaches the browser.

An aiortc peer in the test stands in for the browser. Latencies are printed, not asserted.
"""

from __future__ import annotations

import signal

import aiohttp
import numpy as np
import pytest

from proto import events as ev
from proto import subjects as sj
from services.runtime.bus import Bus
from services.runtime.sessions import open_session
from services.tools.stack import Stack
from tests.support.agent_audio import pack
from tests.support.tap import Tap
from tests.support.webrtc import play, rms, start_replica, tone, wait_connected
from tests.test_gateway import serving

#: Frames that may still reach a WHEP client after the egress stopped: a queued one, a few on the way.
IN_FLIGHT = 4


def agent_reply(session: str, seconds: float, rate: int) -> list[ev.AgentAudioFrame]:
    samples = tone(seconds, rate=rate, hz=300, level=0.4)
    n = rate // 50
    return [
        ev.AgentAudioFrame(
            session=session,
            turn=1,
            index=i,
            chunk=0,
            pcm=samples[i * n : (i + 1) * n].tobytes(),
            sample_rate=rate,
        )
        for i in range(len(samples) // n)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("rate", [48_000, 24_000])
async def test_whep_from_the_egress_plays_the_agent(
    stack: Stack, bus: Bus, session_id: str, rate: int
) -> None:
    await start_replica(stack, "egress")
    spec = ev.SessionSpec(session=session_id, sink="webrtc", output_rate=rate)
    reply = agent_reply(session_id, 2.0, rate)
    async with aiohttp.ClientSession() as http, Tap(bus, session_id) as tap, serving(bus) as url:
        await open_session(bus, spec, stages=("egress",))
        async with play(http, f"{url}/whep/{session_id}") as (pc, heard):
            await wait_connected(pc)
            for audio in pack(reply):
                await bus.publish(sj.AUDIO_OUT, audio)
            await bus.publish(sj.AUDIO_OUT, ev.AgentAudioEnd(session=session_id, turn=1, frames=len(reply)))
            stopped = await tap.wait(ev.PlayoutStopped, timeout=20)
            out = await tap.wait(ev.TurnMark, where=lambda m: m.mark == "first_audio_out")
            loud = await heard.wait_loud(len(reply) - 10)
    assert stopped[0].completed
    print(
        f"\ndownlink ({rate} Hz): first loud frame received {(loud[0] - out[0].at_ns / 1e9) * 1000:.0f} ms "
        "after the egress played it (queue, tick, Opus, network, decoding)"
    )
    # the whole reply arrived, in real time, as a 300 Hz tone at its level
    assert len(loud) == pytest.approx(len(reply), abs=12)
    assert loud[-1] - loud[0] == pytest.approx(2.0, abs=0.5)
    played = np.concatenate([pcm for t, pcm in heard.frames if t >= loud[5] and t <= loud[-5]])
    assert rms(played) == pytest.approx(rms(tone(1.0, level=0.4)), rel=0.15)


@pytest.mark.slow
async def test_an_interrupt_silences_the_browser_at_once(stack: Stack, bus: Bus, session_id: str) -> None:
    await start_replica(stack, "egress")
    spec = ev.SessionSpec(session=session_id, sink="webrtc", output_rate=48_000)
    reply = agent_reply(session_id, 6.0, 48_000)
    async with aiohttp.ClientSession() as http, Tap(bus, session_id) as tap, serving(bus) as url:
        await open_session(bus, spec, stages=("egress",))
        async with play(http, f"{url}/whep/{session_id}") as (pc, heard):
            await wait_connected(pc)
            for audio in pack(reply):
                await bus.publish(sj.AUDIO_OUT, audio)
            await heard.wait_loud(50)  # a second of the reply has been heard
            cut = await bus.publish(sj.CONTROL, ev.Interrupt(session=session_id, turn=1))
            ack = await tap.wait(
                ev.ControlAck, where=lambda a: a.stage == "egress" and a.acked == "Interrupt"
            )
            await tap.wait(ev.PlayoutStopped)
            received_then = len(heard.frames)
            await heard.wait_frames(received_then + 50)  # another second of the track
    after_cut = [t for t in heard.loud() if t > cut.ts / 1e9]
    print(
        f"\ninterrupt: egress acked {(ack[0].ts - cut.ts) / 1e6:.0f} ms after the Interrupt; "
        f"{len(after_cut)} loud frames reached the browser after it (already on their way)"
    )
    assert len(heard.loud()) < len(reply) / 2  # the rest of the reply was dropped, not played
    # silence from the stop on, but for what was already on its way
    assert all(rms(pcm) < 0.001 for _, pcm in heard.frames[received_then + IN_FLIGHT :])


@pytest.mark.slow
async def test_after_the_owner_dies_a_new_offer_reaches_its_successor(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    """The page re-offers when its connection fails; the gateway takes the offer to the new owner."""
    first, second = [await start_replica(stack, "egress") for _ in range(2)]
    spec = ev.SessionSpec(session=session_id, sink="webrtc", output_rate=48_000)
    async with aiohttp.ClientSession() as http, serving(bus, signal_timeout_s=10) as url:
        owners = await open_session(bus, spec, stages=("egress",))
        (owner,) = [p for p in (first, second) if p.replica == owners["egress"].replica]
        async with play(http, f"{url}/whep/{session_id}") as (pc, _):
            await wait_connected(pc)
            stack.kill(owner, signal.SIGKILL)
        async with play(http, f"{url}/whep/{session_id}") as (pc, heard):
            await wait_connected(pc)
            for audio in pack(agent_reply(session_id, 1.0, 48_000)):
                await bus.publish(sj.AUDIO_OUT, audio)
            await heard.wait_loud(40)  # the successor's voice
    assert not owner.alive
