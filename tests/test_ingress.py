"""The ingress as its own process on a real nats-server: caller audio in, frames and speech events out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from services.runtime.bus import Bus
from services.runtime.sessions import open_session
from services.tools.stack import Stack, StageProcess
from tests.support.tap import Tap

DATA = Path(__file__).parent / "data"
FRAME = 320  # samples of a 20 ms frame at 16 kHz
PAD = 2 * 2560  # 320 ms of silence before speech: it starts on the VAD window grid (SCENARIO.md)
SPEECH_MS = 1500
MIN_SILENCE_MS = 200
TOLERANCE_MS = 2 * 32  # two VAD windows


def speech() -> np.ndarray:
    with wave.open(str(DATA / "speech_1500ms_16k.wav"), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def silence(ms: int) -> np.ndarray:
    return np.zeros(ms * 16, "<i2")


def caller_audio(session: str, audio16: np.ndarray, rate: int, channels: int) -> list[ev.CallerAudio]:
    """``audio16`` as an edge would send it: 20 ms chunks at ``rate``, the last one marked."""
    audio = audio16 if rate == 16000 else soxr.resample(audio16, 16000, rate, quality="HQ")
    interleaved = np.repeat(audio, channels)
    step = rate // 50 * channels
    starts = range(0, len(interleaved), step)
    return [
        ev.CallerAudio(
            session=session,
            pcm=interleaved[at : at + step].tobytes(),
            sample_rate=rate,
            channels=channels,
            last=at + step >= len(interleaved),
        )
        for at in starts
    ]


async def feed(bus: Bus, chunks: list[ev.CallerAudio], period_s: float = 0.0) -> None:
    """Publish the chunks, on an absolute schedule when ``period_s`` is set."""
    t0 = time.monotonic()
    for i, chunk in enumerate(chunks):
        if period_s:
            await asyncio.sleep(max(0.0, t0 + i * period_s - time.monotonic()))
        await bus.publish(sj.MEDIA_IN, chunk)


async def start_ingress(stack: Stack, count: int = 1, **env: str) -> list[StageProcess]:
    procs = [stack.spawn("ingress", env=env) for _ in range(count)]
    await stack.wait_ready_async(procs)
    return procs


def on(tap: Tap, channel: sj.Channel) -> list[ev.Event]:
    subject = channel.subject(tap.session)
    return [e for s, e, _ in tap.events if s == subject]


def near(value: int, expected: int) -> bool:
    return abs(value - expected) <= TOLERANCE_MS


@pytest.mark.slow
async def test_speech_at_48k_stereo_becomes_frames_and_one_segment(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await start_ingress(stack)
    audio = np.concatenate((silence(320), speech(), silence(1200)))
    total = len(audio) // FRAME
    async with Tap(bus, session_id) as tap:
        await open_session(bus, ev.SessionSpec(session=session_id), stages=("ingress",))
        fed_from = time.time_ns()
        await feed(bus, caller_audio(session_id, audio, 48000, 2))
        await tap.wait_frames(count=total, timeout=30)
        await tap.wait(ev.SpeechStopped, count=2)  # in-band and on the speech channel

    assert [f.index for f in tap.frames()] == list(range(total))
    (started,) = [e for e in on(tap, sj.SPEECH) if isinstance(e, ev.SpeechStarted)]
    (stopped,) = [e for e in on(tap, sj.SPEECH) if isinstance(e, ev.SpeechStopped)]
    speech_end_ms = 320 + SPEECH_MS
    assert started.segment == stopped.segment == 0
    assert near(started.start_ms, 320) and stopped.start_ms == started.start_ms
    assert near(stopped.end_ms, speech_end_ms)
    assert near(stopped.at_frame * 20, speech_end_ms + MIN_SILENCE_MS)
    assert near(started.at_frame * 20, started.start_ms + 96)
    assert fed_from <= stopped.speech_end_ts <= stopped.ts

    # in-band: each speech event right after the frame that triggered it (the last of its UserAudio:
    # held frames go out first, then the event at once), and the same event as on `speech`
    in_band = on(tap, sj.AUDIO_IN)
    for event in (started, stopped):
        (at,) = [i for i, e in enumerate(in_band) if type(e) is type(event)]
        before, after = in_band[at - 1], in_band[at + 1]
        assert isinstance(before, ev.UserAudio) and before.index + before.frames - 1 == event.at_frame
        assert isinstance(after, ev.UserAudio) and after.index == event.at_frame + 1
        assert codec.stamp(in_band[at], 0, 0) == codec.stamp(event, 0, 0)
    # several frames per message: about a fifth of the messages, plus the flushes before the two
    # speech events, at the end and at the checkpoints (about one a second)
    batches = tap.of(ev.UserAudio)
    assert all(1 <= b.frames <= ev.USER_AUDIO_MAX_FRAMES for b in batches)
    assert len(batches) <= total // ev.USER_AUDIO_MAX_FRAMES + 10

    probs = [f.speech_prob for f in tap.frames()]
    assert max(probs[:14]) < 0.1 and max(probs[20:90]) > 0.9 and max(probs[110:]) < 0.1


async def test_silence_and_low_noise_start_no_speech(stack: Stack, bus: Bus, session_id: str) -> None:
    await start_ingress(stack)
    noise = (np.random.default_rng(7).standard_normal(2 * 16000) * 300).astype("<i2")  # about -40 dBFS
    audio = np.concatenate((silence(2000), noise))
    async with Tap(bus, session_id) as tap:
        await open_session(bus, ev.SessionSpec(session=session_id), stages=("ingress",))
        await feed(bus, caller_audio(session_id, audio, 8000, 1))
        await tap.wait_frames(count=len(audio) // FRAME, timeout=30)

    assert [f.index for f in tap.frames()] == list(range(len(audio) // FRAME))
    assert not tap.of(ev.SpeechStarted) and not tap.of(ev.SpeechStopped)
    assert max(f.speech_prob for f in tap.frames()) < 0.5


def write_wav(path: Path, audio16: np.ndarray, rate: int, channels: int) -> Path:
    audio = soxr.resample(audio16, 16000, rate, quality="HQ")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(audio, channels).tobytes())
    return path


async def test_the_file_source_plays_a_wav_paced_then_ends_the_session_after_the_tail(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_ingress(stack, VB_INGRESS_FILE_TAIL="1")
    audio = np.concatenate((silence(320), speech(), silence(500)))
    path = write_wav(tmp_path / "caller.wav", audio, 22050, 2)
    speed = 8.0
    total = len(audio) // FRAME + 50  # the file, then 1 s of silence
    spec = ev.SessionSpec(session=session_id, source="file", source_uri=str(path), speed=speed)
    async with Tap(bus, session_id) as tap:
        opened = time.time_ns()
        await open_session(bus, spec, stages=("ingress",))
        (ended,) = await tap.wait(ev.SessionEnded, timeout=30)

    assert ended.reason == "completed"
    played = tap.frames()
    assert [f.index for f in played] == list(range(total))
    assert [e.segment for e in on(tap, sj.SPEECH)] == [0, 0]
    assert max(f.speech_prob for f in played[20:90]) > 0.9
    # paced on the session's clock: the last frame is not due before its slot on the schedule
    period_ns = 20_000_000 / speed
    assert played[-1].ts >= opened + (total - 1) * period_ns
    assert ended.ts >= played[-1].ts


async def test_bad_caller_audio_is_reported_and_the_stream_goes_on(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await start_ingress(stack)
    good = caller_audio(session_id, (np.arange(16 * 200) % 100).astype("<i2"), 16000, 1)
    subject = sj.MEDIA_IN.subject(session_id)
    odd = {"type": "CallerAudio", "session": session_id, "pcm": b"\0" * 3, "sample_rate": 16000}
    async with Tap(bus, session_id) as tap:
        await open_session(bus, ev.SessionSpec(session=session_id), stages=("ingress",))
        await feed(bus, good[:4])
        await bus.nc.publish(subject, b"\xc1\xc1not msgpack")
        await bus.publish(sj.MEDIA_IN, ev.CallerAudio(session=session_id, pcm=b"\0" * 640, sample_rate=96000))
        await bus.nc.publish(subject, codec.encode(odd))
        await feed(bus, good[4:])
        errors = await tap.wait(ev.ErrorEvent, count=3)
        await tap.wait_frames(count=len(good))

    assert {(e.stage, e.code, e.subject) for e in errors} == {("ingress", "malformed", subject)}
    assert any("sample_rate" in e.message for e in errors)
    served = tap.frames()
    assert [f.index for f in served] == list(range(len(good)))
    assert b"".join(f.pcm for f in served) == b"".join(c.pcm for c in good)


async def test_unplayable_sources_are_reported_and_the_replica_serves_on(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_ingress(stack)
    eight_bit = tmp_path / "8bit.wav"
    with wave.open(str(eight_bit), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(b"\x80" * 8000)
    cases = {
        "missing": (
            ev.SessionSpec(session=f"{session_id}-m", source="file", source_uri=str(tmp_path / "no.wav")),
            "no such file",
        ),
        "8-bit": (
            ev.SessionSpec(session=f"{session_id}-8", source="file", source_uri=str(eight_bit)),
            "8-bit",
        ),
        "livekit": (ev.SessionSpec(session=f"{session_id}-l", source="livekit"), "LiveKit is not configured"),
    }
    for spec, reason in cases.values():
        async with Tap(bus, spec.session) as tap:
            await open_session(bus, spec, stages=("ingress",))
            (error,) = await tap.wait(ev.ErrorEvent)
        assert error.stage == "ingress" and error.code == "malformed"
        assert reason in error.message and (spec.source_uri in error.message or spec.source == "livekit")

    async with Tap(bus, session_id) as tap:  # the same replica still serves a session that works
        await open_session(bus, ev.SessionSpec(session=session_id), stages=("ingress",))
        await feed(bus, caller_audio(session_id, silence(100), 16000, 1))
        await tap.wait_frames(count=5)
    assert all(p.alive for p in stack.processes)


@pytest.mark.slow
async def test_a_successor_continues_the_frames_after_the_owner_is_killed_mid_stream(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await start_ingress(stack, 2)
    audio = np.concatenate((silence(320), speech(), silence(1000), speech(), silence(1000)))
    total = len(audio) // FRAME
    second_speech_frame = (320 + SPEECH_MS + 1000) // 20
    async with Tap(bus, session_id) as tap:
        owners = await open_session(bus, ev.SessionSpec(session=session_id), stages=("ingress",))
        feeder = asyncio.create_task(feed(bus, caller_audio(session_id, audio, 16000, 1), period_s=0.02))
        try:
            # kill the owner inside the second segment: frames, VAD state and segment count must carry on
            await tap.wait_frames(lambda f: f.index >= second_speech_frame + 10, timeout=30)
            (owner,) = [p for p in stack.of("ingress") if p.replica == owners["ingress"].replica]
            await asyncio.to_thread(stack.kill, owner, signal.SIGKILL)
            await feeder
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        await tap.wait_frames(lambda f: f.index == total - 1, timeout=30)
        await tap.wait(ev.SpeechStopped, lambda e: e.segment == 1, timeout=10)

    seen = tap.frames()
    assert {f.index for f in seen} == set(range(total))
    # an index is only ever re-published with the same audio (stt keeps the first copy)
    for f in seen:
        assert f.pcm == audio[f.index * FRAME : (f.index + 1) * FRAME].tobytes(), f"frame {f.index} differs"
    successor = [f.index for f in seen if f.seq >> 32 == 2]
    assert successor and 0 < min(successor) <= max(f.index for f in seen if f.seq >> 32 == 1) + 1
    # the speech events agree across the two owners: same segments, same stream times
    speech_events = on(tap, sj.SPEECH)
    starts = {(e.segment, e.start_ms) for e in speech_events if isinstance(e, ev.SpeechStarted)}
    stops = {(e.segment, e.end_ms) for e in speech_events if isinstance(e, ev.SpeechStopped)}
    assert [s for s, _ in sorted(starts)] == [0, 1] and [s for s, _ in sorted(stops)] == [0, 1]
    assert near(sorted(starts)[1][1], second_speech_frame * 20)


@pytest.mark.slow
async def test_a_successor_continues_a_file_where_the_killed_owner_was(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_ingress(stack, 2, VB_INGRESS_FILE_TAIL="1")
    path = write_wav(
        tmp_path / "caller.wav", np.concatenate((silence(320), speech(), silence(500))), 24000, 1
    )
    audio = read_wav(path)
    total = len(audio) // FRAME + 50
    spec = ev.SessionSpec(session=session_id, source="file", source_uri=str(path), speed=2.0)
    async with Tap(bus, session_id) as tap:
        owners = await open_session(bus, spec, stages=("ingress",))
        await tap.wait_frames(lambda f: f.index >= 60, timeout=30)
        (owner,) = [p for p in stack.of("ingress") if p.replica == owners["ingress"].replica]
        await asyncio.to_thread(stack.kill, owner, signal.SIGKILL)
        (ended,) = await tap.wait(ev.SessionEnded, timeout=30)

    assert ended.reason == "completed" and ended.seq >> 32 == 2
    seen = tap.frames()
    assert {f.index for f in seen} == set(range(total))
    silent = bytes(2 * FRAME)
    for f in seen:  # the successor resumed the file at the checkpointed position, not from its start
        expected = (
            audio[f.index * FRAME : (f.index + 1) * FRAME].tobytes()
            if f.index * FRAME < len(audio)
            else silent
        )
        assert f.pcm == expected, f"frame {f.index} differs"
    first_owner = max(f.index for f in seen if f.seq >> 32 == 1)
    assert 0 < min(f.index for f in seen if f.seq >> 32 == 2) <= first_owner + 1


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(port: int) -> dict[str, float]:
    """The process's Prometheus metrics, unlabelled samples and histogram sums/counts."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        name: float(value)
        for line in text.splitlines()
        if line and not line.startswith("#") and "{" not in line
        for name, value in [line.rsplit(" ", 1)]
    }


@pytest.mark.slow
async def test_cost_and_latency_per_frame_are_measured(
    stack: Stack, bus: Bus, session_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a timed assertion: prints the ingress's CPU per frame and its latencies (see the report)."""
    (proc,) = await start_ingress(stack)
    seconds = 5
    audio = np.concatenate([np.concatenate((silence(500), speech()))] * 3)[: seconds * 16000]
    report = []
    async with Tap(bus, session_id) as tap:
        await open_session(bus, ev.SessionSpec(session=session_id), stages=("ingress",))
        idle_from, idle_cpu = time.monotonic(), cpu_seconds(proc.proc.pid)
        await asyncio.sleep(2)  # the idle cost (heartbeats, health), subtracted below
        idle_rate = (cpu_seconds(proc.proc.pid) - idle_cpu) / (time.monotonic() - idle_from)
        frames_so_far = 0
        for rate, channels in ((16000, 1), (48000, 2)):
            chunks = caller_audio(session_id, audio, rate, channels)
            before, cpu_before = time.monotonic(), cpu_seconds(proc.proc.pid)
            await feed(bus, chunks, period_s=0.02)
            frames_so_far += len(audio) // FRAME
            await tap.wait_frames(count=frames_so_far, timeout=30)
            busy = cpu_seconds(proc.proc.pid) - cpu_before - idle_rate * (time.monotonic() - before)
            report.append(f"{rate} Hz x{channels}: {busy / (len(audio) // FRAME) * 1e6:.0f} us CPU per frame")
            if rate == 16000:  # chunk i is frame i: edge publish -> frame published, bus hop included
                sent = [c.ts for c in tap.of(ev.CallerAudio)]
                hop = sorted((f.ts - sent[f.index]) / 1e6 for f in tap.frames())
                p50, p95 = hop[len(hop) // 2], hop[len(hop) * 95 // 100]
                report.append(f"edge -> frame published: p50 {p50:.2f} ms, p95 {p95:.2f} ms")

    metrics = scrape(proc.http_port)
    windows = metrics["vb_ingress_vad_batch_windows_sum"]
    assert windows >= 2 * (len(audio) // 512)  # every 32 ms window went through Silero
    assert [f.index for f in tap.frames()] == list(range(frames_so_far))
    vad_us = metrics["vb_ingress_vad_inference_seconds_sum"] / windows * 1e6
    delay_us = (
        metrics["vb_ingress_frame_delay_seconds_sum"] / metrics["vb_ingress_frame_delay_seconds_count"] * 1e6
    )
    report.append(
        f"VAD inference {vad_us:.0f} us per window; arrival -> frame published {delay_us:.0f} us (means)"
    )
    with capsys.disabled():
        print("\ningress cost: " + "; ".join(report))
