"""The WebRTC legs' pure parts: the agent's outgoing queue and track, offer clean-up, the jitter buffer."""

from __future__ import annotations

import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from services.webrtc.peer import shorten_jitter_buffer, strip_mdns
from services.webrtc.voice import OUT_RATE, OUT_SAMPLES, AgentTrack, AgentVoice, dropped_frames
from tests.support.webrtc import rms, tone


def frames_of(samples: np.ndarray, rate: int) -> list[bytes]:
    n = rate // 50
    return [samples[i : i + n].tobytes() for i in range(0, len(samples) - n + 1, n)]


def test_48k_frames_pass_through_unchanged() -> None:
    voice = AgentVoice(OUT_RATE, max_frames=5)
    frame = frames_of(tone(0.02), OUT_RATE)[0]
    voice.push(frame)
    assert voice.pop() == frame
    assert voice.pop() is None


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 24000, 44100])
def test_every_tick_finds_a_frame_at_other_rates(rate: int) -> None:
    """Resampled audio never leaves a tick short (no gap in the agent's voice) nor piles up (no delay)."""
    voice = AgentVoice(rate, max_frames=5)
    out = []
    for frame in frames_of(tone(5.0, rate=rate, hz=300), rate):
        voice.push(frame)
        popped = voice.pop()
        assert popped is not None
        assert voice.queued_ms < 5  # only the few ms of margin wait behind the frame sent
        out.append(np.frombuffer(popped, np.int16))
    played = np.concatenate(out)
    assert len(played) == len(out) * OUT_SAMPLES
    steady = played[OUT_RATE // 10 :]  # past the resampler's start
    assert rms(steady) == pytest.approx(rms(tone(1.0, hz=300)), rel=0.05)
    spectrum = np.abs(np.fft.rfft(steady[:OUT_RATE]))
    assert np.argmax(spectrum) == pytest.approx(300, abs=2)  # 1 Hz bins: still a 300 Hz tone at 48 kHz


def test_a_full_queue_drops_the_oldest_audio() -> None:
    voice = AgentVoice(OUT_RATE, max_frames=3)
    before = dropped_frames._value.get()
    frames = [np.full(OUT_SAMPLES, i, np.int16).tobytes() for i in range(10)]
    for frame in frames:
        voice.push(frame)
    assert voice.queued_ms == 60
    assert dropped_frames._value.get() - before == 7
    assert [voice.pop() for _ in range(4)] == [*frames[7:], None]


def test_flush_empties_at_once_and_the_next_reply_starts_whole() -> None:
    voice = AgentVoice(24_000, max_frames=5)
    frames = frames_of(tone(0.2, rate=24_000), 24_000)
    for frame in frames[:3]:
        voice.push(frame)
    voice.flush()
    assert voice.pop() is None
    assert voice.queued_ms == 0
    voice.push(frames[3])
    assert voice.pop() is not None


async def test_the_track_sends_48k_frames_on_one_clock_with_silence_between() -> None:
    voice = AgentVoice(OUT_RATE, max_frames=5)
    voice.push(tone(0.02).tobytes())  # queued before the connection: not for this caller
    track = AgentTrack(voice)
    first = await track.recv()
    voice.push(tone(0.02).tobytes())
    second = await track.recv()
    third = await track.recv()
    assert [f.pts for f in (first, second, third)] == [0, OUT_SAMPLES, 2 * OUT_SAMPLES]
    assert {(f.sample_rate, f.samples, f.layout.name) for f in (first, second, third)} == {
        (OUT_RATE, 960, "stereo")
    }
    left = [f.to_ndarray().reshape(-1, 2)[:, 0] for f in (first, second, third)]
    assert [rms(pcm) for pcm in left] == [0.0, pytest.approx(rms(tone(0.02))), 0.0]  # at full level
    track.stop()


def test_mdns_candidates_are_left_out() -> None:
    offer = (
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
        "a=candidate:1 1 udp 2122260223 4b5e0c1a-1234.local 50000 typ host\r\n"
        "a=candidate:2 1 udp 2122260223 192.0.2.7 50001 typ host\r\n"
    )
    assert strip_mdns(offer).splitlines() == [
        "v=0",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=candidate:2 1 udp 2122260223 192.0.2.7 50001 typ host",
    ]


async def test_the_jitter_buffer_is_replaced_before_media_flows() -> None:
    browser, server = RTCPeerConnection(), RTCPeerConnection()
    browser.addTransceiver("audio", direction="sendonly")
    await browser.setLocalDescription(await browser.createOffer())
    await server.setRemoteDescription(RTCSessionDescription(sdp=browser.localDescription.sdp, type="offer"))
    receiver = server.getTransceivers()[0].receiver
    shorten_jitter_buffer(receiver, 0)
    buffer = receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
    assert (buffer.capacity, buffer._prefetch) == (16, 0)
    await browser.close()
    await server.close()
