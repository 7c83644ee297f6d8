"""The WebRTC source: decoded Opus to 16 kHz caller frames, the echo guard, and WHIP into a real ingress.

The process tests run an ingress replica on the real bus with the gateway in the test process; an
aiortc peer stands in for the browser. Latencies are printed, not asserted.
"""

from __future__ import annotations

import fractions
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soxr
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame
from av import AudioFrame

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import FRAME_SAMPLES, Framer
from services.ingress.webrtc import EchoGuard, Uplink
from services.runtime.bus import Bus
from services.runtime.sessions import open_session
from services.tools.stack import Stack
from tests.support.tap import CallerFrame, Tap
from tests.support.webrtc import RATE, SamplesTrack, publish, rms, start_replica, tone
from tests.test_gateway import serving

DATA = Path(__file__).parent / "data"


def decoded_opus(samples: np.ndarray) -> list[AudioFrame]:
    """``samples`` (48 kHz mono, sent as both channels) through a real Opus encoder and decoder."""
    encoder, decoder = OpusEncoder(), OpusDecoder()
    frames = []
    for i in range(len(samples) // 960):
        stereo = np.repeat(samples[i * 960 : (i + 1) * 960], 2).reshape(1, -1)
        frame = AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = RATE, i * 960, fractions.Fraction(1, RATE)
        payloads, timestamp = encoder.encode(frame)
        for payload in payloads:
            frames += decoder.decode(JitterFrame(data=payload, timestamp=timestamp))
    return frames


def test_each_decoded_opus_frame_becomes_one_20ms_caller_frame() -> None:
    decoded = decoded_opus(tone(2.0, hz=440))
    assert {(f.sample_rate, f.samples, f.layout.name) for f in decoded} == {(48_000, 960, "stereo")}
    uplink, framer = Uplink(), Framer()
    out = []
    for frame in decoded:
        samples = uplink.convert(frame)
        assert len(samples) == FRAME_SAMPLES  # the first one too: no frame waits for the next packet
        frames = framer.push(samples)
        assert len(frames) == 1
        assert framer.pending == b""
        out.append(frames[0])
    audio = np.concatenate(out)
    steady = audio[3200:19200]  # a second, past the codec's start
    spectrum = np.abs(np.fft.rfft(steady))
    assert np.argmax(spectrum) == pytest.approx(440, abs=2)  # 1 Hz bins at 16 kHz: the same tone
    assert rms(steady) == pytest.approx(rms(tone(1.0)), rel=0.1)  # at its level: channels averaged


def test_the_echo_guard_silences_the_window_after_the_agent_starts() -> None:
    guard = EchoGuard(300)
    loud = tone(0.02, rate=16_000)
    ms = 1_000_000
    assert guard.filter(loud, 1_000 * ms) is loud  # before the agent speaks
    guard.agent_started(2_000 * ms)
    assert not guard.filter(loud, 2_000 * ms).any()
    assert not guard.filter(loud, 2_299 * ms).any()
    assert guard.filter(loud, 2_300 * ms) is loud
    guard.agent_started(1_500 * ms)  # an older report (redelivered) does not move the window back
    assert guard.filter(loud, 2_350 * ms) is loud
    guard.agent_started(3_000 * ms)  # the agent resumes: a new window
    assert not guard.filter(loud, 3_100 * ms).any()
    assert guard.silenced == 3


def test_a_zero_echo_guard_lets_everything_through() -> None:
    guard = EchoGuard(0)
    guard.agent_started(1_000)
    loud = tone(0.02, rate=16_000)
    assert guard.filter(loud, 1_000) is loud


# --- WHIP into an ingress process ---------------------------------------------------------------


def speech_16k() -> np.ndarray:
    with wave.open(str(DATA / "speech_1500ms_16k.wav"), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def envelope(audio: np.ndarray) -> np.ndarray:
    """RMS of each 20 ms frame."""
    return np.array([rms(audio[i : i + 320]) for i in range(0, len(audio) - 319, 320)])


def best_match(sent: np.ndarray, received: np.ndarray) -> float:
    """Correlation of the sent loudness envelope with the received one, at the best frame offset."""
    return max(
        float(np.corrcoef(sent, received[lag : lag + len(sent)])[0, 1])
        for lag in range(len(received) - len(sent))
    )


def loud(frames: list[CallerFrame], threshold: float = 0.02) -> list[CallerFrame]:
    return [f for f in frames if rms(np.frombuffer(f.pcm, "<i2")) > threshold]


@pytest.mark.slow
async def test_whip_into_the_ingress_carries_the_callers_voice(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await start_replica(stack, "ingress")
    spec = ev.SessionSpec(session=session_id, source="webrtc")
    async with aiohttp.ClientSession() as http, Tap(bus, session_id) as tap, serving(bus) as url:
        await open_session(bus, spec, stages=("ingress",))
        speech = speech_16k()
        track = SamplesTrack(soxr.resample(speech, 16_000, RATE, quality="HQ").astype(np.int16), lead_s=0.5)
        async with publish(http, f"{url}/whip/{session_id}", track) as pc:
            stopped = await tap.wait(ev.SpeechStopped, timeout=30)
            frames = tap.frames()
            heard = loud(frames)
            first_loud_ns = min(f.ts for f in heard)
            uplink_ms = (first_loud_ns / 1e9 - track.audio_start) * 1000
            print(f"\nuplink: the first loud frame was published {uplink_ms:.0f} ms after it was sent")
            assert pc.connectionState == "connected"
        indexes = [f.index for f in frames]
        assert indexes == list(range(len(indexes)))  # one numbered 20 ms frame after another, none lost
        assert all(len(f.pcm) == 640 for f in frames)
        # the frames carry the caller's 1.5 s of speech, syllable by syllable, and the VAD found it
        received = envelope(np.concatenate([np.frombuffer(f.pcm, "<i2") for f in frames]))
        assert best_match(envelope(speech), received) > 0.9
        started = tap.of(ev.SpeechStarted)  # in-band on audio.in and on speech: one segment
        assert {e.segment for e in started} == {0}
        assert stopped[0].end_ms - started[0].start_ms == pytest.approx(1500, abs=200)


@pytest.mark.slow
async def test_the_echo_guard_silences_the_caller_as_the_agent_starts(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await start_replica(stack, "ingress", VB_WEBRTC_ECHO_GUARD_MS="600")
    spec = ev.SessionSpec(session=session_id, source="webrtc")
    async with aiohttp.ClientSession() as http, Tap(bus, session_id) as tap, serving(bus) as url:
        await open_session(bus, spec, stages=("ingress",))
        async with publish(http, f"{url}/whip/{session_id}", SamplesTrack(tone(30.0, hz=200))):
            await tap.wait_frames(where=lambda f: rms(np.frombuffer(f.pcm, "<i2")) > 0.1, count=25)
            started = await bus.publish(sj.PLAYOUT, ev.PlayoutStarted(session=session_id, turn=1))
            after = started.ts + 1_000_000_000
            await tap.wait_frames(where=lambda f: f.ts > after, timeout=20)
    frames = tap.frames()
    silent = [f for f in frames if rms(np.frombuffer(f.pcm, "<i2")) < 0.001]
    # 600 ms of the tone, from the agent's start, came out as silence; nothing before or after
    assert len(silent) * 20 == pytest.approx(600, abs=60)
    assert all(started.ts <= f.ts <= started.ts + 800_000_000 for f in silent)


@pytest.mark.slow
async def test_a_caller_who_never_connects_is_hung_up(stack: Stack, bus: Bus, session_id: str) -> None:
    await start_replica(stack, "ingress", VB_WEBRTC_HANGUP_S="1")
    async with Tap(bus, session_id) as tap:
        await open_session(bus, ev.SessionSpec(session=session_id, source="webrtc"), stages=("ingress",))
        ended = await tap.wait(ev.SessionEnded, timeout=15)
    assert ended[0].reason == "hangup"
