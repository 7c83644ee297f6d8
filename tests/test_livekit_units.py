"""The LiveKit bridge's audio path through the real ``livekit.rtc`` SDK, with no server.

An ``rtc.AudioSource`` and a local track feed ``rtc.AudioStream`` offline (the SDK's own framing,
resampling and pacing run): the caller's side gets 48 kHz stereo into the listener's 16 kHz mono
20 ms frames; the agent's side checks that the voice's queue holds little and that a flush drops it.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import numpy.typing as npt
import pytest
from livekit import rtc

from proto.events import FRAME_MS, USER_RATE
from services.livekit.listener import caller_stream, frame_samples
from services.livekit.voice import AgentVoice
from tests.fakes.livekit_media import dominant_hz, rms, tone

IN_RATE = 48_000


async def feed(source: rtc.AudioSource, pcm: npt.NDArray[np.int16], rate: int, channels: int) -> None:
    """Capture ``pcm`` (interleaved) in 20 ms frames on a real-time schedule, as the egress paces."""
    n = rate * FRAME_MS // 1000
    frames = len(pcm) // (n * channels)
    start = time.monotonic()
    for i in range(frames):
        await asyncio.sleep(max(0.0, start + i * FRAME_MS / 1000 - time.monotonic()))
        chunk = pcm[i * n * channels : (i + 1) * n * channels]
        await source.capture_frame(rtc.AudioFrame(chunk.tobytes(), rate, channels, n))


async def collect(stream: rtc.AudioStream, frames: int) -> list[rtc.AudioFrame]:
    out = []
    async for event in stream:
        out.append(event.frame)
        if len(out) == frames:
            break
    return out


async def test_caller_stream_turns_48k_stereo_into_16k_mono_20ms_frames() -> None:
    source = rtc.AudioSource(IN_RATE, 2, queue_size_ms=200)
    track = rtc.LocalAudioTrack.create_audio_track("caller", source)
    stream = caller_stream(track)
    left, right = tone(1.0, 440.0, IN_RATE), tone(1.0, 440.0, IN_RATE, level=0.1)
    stereo = np.stack((left, right), axis=1).reshape(-1)
    try:
        reader = asyncio.create_task(collect(stream, 40))
        await feed(source, stereo, IN_RATE, 2)
        frames = await asyncio.wait_for(reader, 10)
    finally:
        await stream.aclose()
        await source.aclose()

    assert {(f.sample_rate, f.num_channels, f.samples_per_channel) for f in frames} == {(USER_RATE, 1, 320)}
    samples = [frame_samples(f) for f in frames]
    assert all(s.dtype == np.int16 and len(s) == 320 for s in samples)
    heard = np.concatenate(samples[10:])  # past the resampler's start-up
    assert dominant_hz(heard, USER_RATE) == pytest.approx(440.0, abs=5.0)
    # the channels are mixed: the level of the mean of the two channels, not of either one
    expected = rms(((left.astype(np.int32) + right) // 2).astype(np.int16))
    assert rms(heard) == pytest.approx(expected, rel=0.15)


async def test_agent_voice_plays_at_its_rate_and_holds_at_most_its_queue() -> None:
    rate, queue_ms = 24_000, 100
    voice = AgentVoice(rate, queue_ms)
    stream = rtc.AudioStream(voice.track(), sample_rate=IN_RATE, num_channels=1, frame_size_ms=FRAME_MS)
    try:
        reader = asyncio.create_task(collect(stream, 45))
        pcm = tone(1.0, 660.0, rate)
        queued = []
        n = rate * FRAME_MS // 1000
        start = time.monotonic()
        for i in range(len(pcm) // n):  # paced, as the egress's playout hands frames over
            await asyncio.sleep(max(0.0, start + i * FRAME_MS / 1000 - time.monotonic()))
            await voice.play(pcm[i * n : (i + 1) * n].tobytes())
            queued.append(voice.queued_s)
        heard = np.concatenate([frame_samples(f) for f in await asyncio.wait_for(reader, 10)][5:])

        # pushed faster than real time, the queue does not grow: play() waits for room instead
        start = time.monotonic()
        for i in range(len(pcm) // n):
            await voice.play(pcm[i * n : (i + 1) * n].tobytes())
            queued.append(voice.queued_s)
        pushed_s = time.monotonic() - start
    finally:
        await stream.aclose()
        await voice.aclose()

    assert dominant_hz(heard, IN_RATE) == pytest.approx(660.0, abs=5.0)
    assert rms(heard) == pytest.approx(rms(pcm), rel=0.15)
    assert max(queued) <= queue_ms / 1000 + FRAME_MS / 1000
    assert pushed_s >= 0.8 * (1.0 - queue_ms / 1000)  # a second of audio took most of a second to take in


async def loud_after(voice: AgentVoice, flush: bool) -> int:
    """Loud frames that come out of the voice after 400 ms of tone was queued at once (then flushed?)."""
    rate = 48_000
    stream = rtc.AudioStream(voice.track(), sample_rate=rate, num_channels=1, frame_size_ms=FRAME_MS)
    n = rate * FRAME_MS // 1000
    try:
        reader = asyncio.create_task(collect(stream, 40))
        pcm = tone(0.4, 500.0, rate)
        for i in range(len(pcm) // n):
            await voice.play(pcm[i * n : (i + 1) * n].tobytes())
        if flush:
            voice.flush()
        await feed(voice.source, np.zeros(rate, np.int16), rate, 1)  # silence after it, in real time
        frames = await asyncio.wait_for(reader, 10)
    finally:
        await stream.aclose()
    return sum(rms(frame_samples(f)) > 0.05 for f in frames)


async def test_flush_drops_the_queued_audio_of_a_cut_reply() -> None:
    kept = AgentVoice(48_000, queue_ms=500)
    dropped = AgentVoice(48_000, queue_ms=500)
    try:
        loud_kept = await loud_after(kept, flush=False)
        loud_dropped = await loud_after(dropped, flush=True)
    finally:
        await kept.aclose()
        await dropped.aclose()

    assert loud_kept >= 15  # without a flush the whole 400 ms plays out
    assert loud_dropped < loud_kept / 2  # flushed: only what the track had already sent
