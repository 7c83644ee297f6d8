"""The stt stage as a process on a real bus: audio frames and VAD events in, transcripts and turns out.

A ``Caller`` plays the ingress's part: 20 ms frames on audio.in (UserAudio of up to five) with
SpeechStarted/SpeechStopped in-band, placed the way the VAD places them (start after its minimum
speech, stop after its silence).
"""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.request
import wave
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.runtime.bus import Bus
from services.runtime.sessions import open_session
from services.tools.stack import Stack
from tests.support.tap import Tap

DATA = Path(__file__).parent / "data"
SPOKEN = "what is the weather like today"  # what speech_1500ms_16k.wav says
MARKS = ["speech_end", "vad_stop", "stt_told", "stt_final", "end_of_turn"]
SILENCE = bytes(640)
BENCH = {"VB_STT_ENGINE": "bench"}


def speech_frames() -> list[bytes]:
    with wave.open(str(DATA / "speech_1500ms_16k.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        pcm = w.readframes(w.getnframes())
    return [pcm[i : i + 640] for i in range(0, len(pcm), 640)]


def normal(text: str) -> str:
    return " ".join(re.findall(r"[a-z']+", text.lower()))


class Caller:
    """Publishes what the ingress would, and remembers it so that it can re-publish (a successor)."""

    def __init__(self, bus: Bus, session: str, *, min_speech: int = 5, end_silence: int = 10) -> None:
        self.bus, self.session = bus, session
        self.min_speech, self.end_silence = min_speech, end_silence
        self.index = self.segment = 0
        self.sent: list[ev.Event] = []
        self.speech_end_ts = 0
        self._start_ms = 0

    async def send(self, event: ev.Event) -> None:
        self.sent.append(event)
        await self.bus.publish(sj.AUDIO_IN, event)

    async def frames(self, chunks: list[bytes]) -> None:
        """The frames in UserAudio events of up to five, the last one shorter (as before a VAD event)."""
        for at in range(0, len(chunks), ev.USER_AUDIO_MAX_FRAMES):
            batch = chunks[at : at + ev.USER_AUDIO_MAX_FRAMES]
            audio = ev.UserAudio(
                session=self.session, index=self.index, pcm=b"".join(batch), speech_probs=(0.0,) * len(batch)
            )
            await self.send(audio)
            self.index += len(batch)

    async def silence(self, frames: int) -> None:
        await self.frames([SILENCE] * frames)

    async def start(self, speech: list[bytes]) -> None:
        """Speech frames, with SpeechStarted after the VAD's minimum speech."""
        self._start_ms = self.index * ev.FRAME_MS
        await self.frames(speech[: self.min_speech])
        await self.send(
            ev.SpeechStarted(
                session=self.session, segment=self.segment, start_ms=self._start_ms, at_frame=self.index - 1
            )
        )
        await self.frames(speech[self.min_speech :])

    async def stop(self) -> None:
        """The VAD's end-of-speech silence, then SpeechStopped."""
        self.speech_end_ts, end_ms = time.time_ns(), self.index * ev.FRAME_MS
        await self.silence(self.end_silence)
        await self.send(
            ev.SpeechStopped(
                session=self.session,
                segment=self.segment,
                start_ms=self._start_ms,
                end_ms=end_ms,
                at_frame=self.index - 1,
                speech_end_ts=self.speech_end_ts,
            )
        )
        self.segment += 1

    async def utterance(self, speech: list[bytes]) -> None:
        await self.start(speech)
        await self.stop()

    async def republish(self) -> None:
        """Everything sent so far, again (what a successor ingress may do)."""
        for event in list(self.sent):
            await self.bus.publish(sj.AUDIO_IN, event)


async def serve(stack: Stack, bus: Bus, session: str, replicas: int = 1, **env: str) -> str:
    """Start stt replicas and open the session on them; returns the owner's replica id."""
    await stack.wait_ready_async([stack.spawn("stt", env=env) for _ in range(replicas)])
    owners = await open_session(bus, ev.SessionSpec(session=session), stages=("stt",))
    return owners["stt"].replica


@pytest.mark.slow
async def test_whisper_transcribes_a_turn_with_every_mark_in_order(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await serve(stack, bus, session_id)
    async with Tap(bus, session_id) as tap:
        caller = Caller(bus, session_id)
        await caller.silence(24)
        await caller.utterance(speech_frames())
        (ended,) = await tap.wait(ev.UserTurnEnded, timeout=60)
        marks = await tap.wait(ev.TurnMark, lambda m: m.stage == "stt", count=len(MARKS))
    (final,) = tap.of(ev.Transcript, lambda t: t.is_final)
    assert normal(final.text) == SPOKEN and (final.turn, final.segment) == (1, 0)
    assert normal(ended.text) == SPOKEN and ended.turn == 1
    assert (ended.start_ms, ended.end_ms) == (24 * 20, (24 + 75) * 20)
    assert ended.speech_end_ts == caller.speech_end_ts
    assert ended.reason == "silence"  # the text reads as finished: the min delay (0) was used
    assert all(m.turn == 1 for m in marks)
    assert [m.mark for m in sorted(marks, key=lambda m: m.at_ns)] == MARKS
    assert {m.mark: m.at_ns for m in marks}["speech_end"] == caller.speech_end_ts


@pytest.mark.slow
async def test_two_segments_with_a_pause_are_one_turn(stack: Stack, bus: Bus, session_id: str) -> None:
    # the min delay outlasts the pause: the turn must go on when speech resumes, not end at the first final
    await serve(stack, bus, session_id, VB_STT_MIN_DELAY="2.0", VB_STT_MAX_DELAY="2.0")
    async with Tap(bus, session_id) as tap:
        caller = Caller(bus, session_id)
        await caller.silence(24)
        await caller.utterance(speech_frames())
        await caller.silence(15)
        await caller.utterance(speech_frames())
        (ended,) = await tap.wait(ev.UserTurnEnded, timeout=60)
    finals = tap.of(ev.Transcript, lambda t: t.is_final)
    assert [(t.turn, t.segment) for t in finals] == [(1, 0), (1, 1)]
    assert all(normal(t.text) == SPOKEN for t in finals)
    assert normal(ended.text) == f"{SPOKEN} {SPOKEN}"
    assert ended.turn == 1 and ended.reason == "silence"
    (last_stop,) = tap.of(ev.SpeechStopped, lambda e: e.segment == 1)
    assert ended.ts - last_stop.ts >= 1.99e9  # it waited the min delay of silence after the second segment
    assert ended.start_ms == 24 * 20 and ended.end_ms == caller.index * 20 - 10 * 20


async def test_bench_engine_answers_each_end_of_speech_once_and_skips_duplicates(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    trace_file = tmp_path / "traces.jsonl"
    text = "Book a table for two."
    tracing = {"VB_TRACE_EXPORTER": "file", "VB_TRACE_FILE": str(trace_file)}
    await serve(stack, bus, session_id, **BENCH, **tracing, VB_STT_BENCH_TEXT=text)
    headers: dict[tuple[str, int], str] = {}

    async def keep_headers(msg: Msg) -> None:
        event = codec.decode(msg.subject, msg.data)
        assert isinstance(event, ev.Transcript | ev.UserTurnEnded)
        headers[(type(event).__name__, event.turn)] = (msg.headers or {}).get("traceparent", "")

    subs = [await bus.nc.subscribe(c.subject(session_id), cb=keep_headers) for c in (sj.TRANSCRIPT, sj.TURN)]
    async with Tap(bus, session_id) as tap:
        caller = Caller(bus, session_id)
        await caller.silence(8)
        await caller.utterance(speech_frames())
        await tap.wait(ev.UserTurnEnded, lambda e: e.turn == 1)
        await caller.republish()  # the same frames and VAD events again: nothing new may come of them
        for turn in (2, 3):
            await caller.silence(8)
            await caller.utterance(speech_frames())
            await tap.wait(ev.UserTurnEnded, lambda e, turn=turn: e.turn == turn)
    for sub in subs:
        await sub.unsubscribe()
    ended = tap.of(ev.UserTurnEnded)
    assert [(e.turn, e.text) for e in ended] == [(1, text), (2, text), (3, text)]
    finals = tap.of(ev.Transcript)
    assert [(t.turn, t.segment, t.text, t.is_final) for t in finals] == [
        (1, 0, text, True),
        (2, 1, text, True),
        (3, 2, text, True),
    ]
    assert len(tap.of(ev.TurnMark, lambda m: m.mark == "stt_told")) == 3

    stack.stop()  # the stage flushes its spans on exit
    spans = {
        (s["attributes"]["turn"]): s
        for s in map(json.loads, trace_file.read_text().splitlines())
        if s["name"] == "turn"
    }
    assert sorted(spans) == [1, 2, 3]
    for turn, span in spans.items():
        assert span["parent_id"] is None  # the root of the turn's trace
        ids = [span["context"]["trace_id"][2:], span["context"]["span_id"][2:]]
        assert headers[("Transcript", turn)].split("-")[1:3] == ids
        assert headers[("UserTurnEnded", turn)].split("-")[1:3] == ids


def frames_skipped(port: int) -> float:
    """The stt replica's count of frames skipped as already handled (its Prometheus metric)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    (value,) = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(FRAMES_SKIPPED)]
    return float(value)


FRAMES_SKIPPED = 'vb_stt_duplicates_total{kind="frame"}'


async def test_frames_a_successor_ingress_batches_differently_are_taken_once_each(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    owner = await serve(stack, bus, session_id, **BENCH)
    (stt,) = [p for p in stack.of("stt") if p.replica == owner]
    async with Tap(bus, session_id) as tap:
        caller = Caller(bus, session_id)
        await caller.silence(10)  # frames 0-4 and 5-9
        caller.index = 3  # a successor resumes from an older checkpoint: frames 3-7 and 8-12
        await caller.silence(10)
        await caller.utterance(speech_frames())
        await tap.wait(ev.UserTurnEnded)
    assert frames_skipped(stt.http_port) == 7  # frames 3 to 9, each once; 10 to 12 are new


async def test_bad_input_is_reported_and_the_session_goes_on(stack: Stack, bus: Bus, session_id: str) -> None:
    await serve(stack, bus, session_id, **BENCH)

    def user_audio(pcm_bytes: int, frames: int) -> bytes:  # built raw: the constructor refuses these
        audio = {"type": "UserAudio", "session": session_id, "index": 0, "pcm": b"\0" * pcm_bytes}
        return codec.encode({**audio, "speech_probs": [0.0] * frames})

    short_frame = user_audio(100, 1)  # not a 20 ms frame
    part_frame = user_audio(2 * 640 + 320, 2)  # two frames and a half
    six_frames = user_audio(6 * 640, 6)  # more than USER_AUDIO_MAX_FRAMES
    wrong_type = ev.Transcript(session=session_id, turn=1, segment=0, text="hi", is_final=True)
    async with Tap(bus, session_id) as tap:
        await bus.nc.publish(sj.AUDIO_IN.subject(session_id), b"\xc1 not msgpack")
        for bad_audio in (short_frame, part_frame, six_frames):
            await bus.nc.publish(sj.AUDIO_IN.subject(session_id), bad_audio)
        await bus.nc.publish(sj.AUDIO_IN.subject(session_id), codec.encode(wrong_type))
        await bus.nc.publish(sj.CONTROL.subject(session_id), b"\xc1 not msgpack")
        stray = ev.SpeechStopped(
            session=session_id, segment=5, start_ms=0, end_ms=100, at_frame=0, speech_end_ts=1
        )
        await bus.publish(sj.AUDIO_IN, stray)
        errors = await tap.wait(ev.ErrorEvent, lambda e: e.stage == "stt", count=7)
        caller = Caller(bus, session_id)
        await caller.silence(8)
        await caller.utterance(speech_frames())
        (ended,) = await tap.wait(ev.UserTurnEnded)
    assert sorted(e.code for e in errors) == ["malformed"] * 6 + ["wrong_subject"]
    assert any("segment 5, which never started" in e.message for e in errors)
    audio_errors = [e.message for e in errors if "UserAudio" in e.message or "pcm" in e.message]
    assert any("pcm of 1600 bytes is not 1 to 5 whole 20 ms frames" in m for m in audio_errors), audio_errors
    assert any("length <= 3200" in m and "$.pcm" in m for m in audio_errors), audio_errors
    assert ended.turn == 1  # the stray stop opened no turn
    assert all(p.alive for p in stack.processes)


@pytest.mark.slow
async def test_successor_transcribes_the_turn_its_predecessor_died_in(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    owner = await serve(stack, bus, session_id, replicas=2, VB_STT_PARTIAL_INTERVAL="0.5")
    speech = speech_frames()
    async with Tap(bus, session_id) as tap:
        caller = Caller(bus, session_id)
        await caller.silence(24)
        await caller.start(speech[:60])
        await tap.wait(ev.Transcript, lambda t: not t.is_final and t.turn == 1, timeout=60)
        (victim,) = [p for p in stack.of("stt") if p.replica == owner]
        stack.kill(victim, signal.SIGKILL)  # in the middle of the turn's audio
        await caller.frames(speech[60:])
        await caller.stop()
        (ended,) = await tap.wait(ev.UserTurnEnded, timeout=60)
    assert normal(ended.text) == SPOKEN and ended.turn == 1
    assert ended.seq >> 32 == 2  # published by the successor (the session's second claim)
    assert (ended.start_ms, ended.speech_end_ts) == (24 * 20, caller.speech_end_ts)


async def test_an_engine_that_never_answers_is_reported_and_the_turn_ends(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    # no endpointing wait: the turn ends as soon as its final is given up on, before the report is out
    stalled_engine = {
        "VB_STT_BENCH_DELAY": "60",
        "VB_STT_FINAL_TIMEOUT": "0.3",
        "VB_STT_MIN_DELAY": "0",
        "VB_STT_MAX_DELAY": "0",
    }
    await serve(stack, bus, session_id, **BENCH, **stalled_engine)
    async with Tap(bus, session_id) as tap:
        caller = Caller(bus, session_id)
        for turn in (1, 2):
            await caller.silence(8)
            await caller.utterance(speech_frames())
            (stalled,) = await tap.wait(ev.ErrorEvent, lambda e, turn=turn: e.turn == turn)
            assert (stalled.stage, stalled.code, stalled.retryable) == ("stt", "provider", True)
            assert "gave no final" in stalled.message
    # turn 1 ended (without words: no UserTurnEnded), so the next speech opened turn 2
    assert tap.of(ev.UserTurnEnded) == []
    assert tap.of(ev.Transcript) == []
